"""Exact DeeperLab targets on hand-built panoptic maps."""

import numpy as np
import pytest
import torch
from conftest import keypoint_target_generator

from deeperlab_d2.data.target_generator import (
    CENTER,
    KEYPOINT_EDGES,
    KEYPOINT_NAMES,
    instance_keypoints,
)

THING, STUFF, IGNORE = 0, 3, 255
TL, TR, BL, BR = (
    KEYPOINT_NAMES.index(n) for n in ("top_left", "top_right", "bottom_left", "bottom_right")
)


def make_gen(radius=3.0, **kw):
    return keypoint_target_generator([THING, 1, 2], IGNORE, keypoint_radius=radius, **kw)


def stuff_background(h, w):
    pan = np.ones((h, w), dtype=np.int64)  # id 1 = stuff
    return pan, [{"id": 1, "category_id": STUFF, "iscrowd": 0}]


def disk_count(radius):
    r = int(radius)
    return sum(
        1 for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius**2
    )


def test_constants():
    assert KEYPOINT_NAMES[CENTER] == "center"
    assert len(KEYPOINT_EDGES) == 8
    # star graph: every edge touches the center, both directions present
    assert all(CENTER in e for e in KEYPOINT_EDGES)
    assert set(KEYPOINT_EDGES) == {(CENTER, k) for k in range(4)} | {(k, CENTER) for k in range(4)}


def l_shape():
    pan, segs = stuff_background(40, 50)
    pan[5:20, 5:10] = 2  # vertical bar: 15 x 5 = 75 px
    pan[20:25, 5:25] = 2  # horizontal bar: 5 x 20 = 100 px
    segs.append({"id": 2, "category_id": THING, "iscrowd": 0})
    return pan, segs


def test_l_shape_keypoints_offsets_and_weights():
    pan, segs = l_shape()
    t = make_gen(radius=3.0)(pan, segs)
    cy, cx = 3100 / 175, 1975 / 175  # center of mass, computed by hand
    expected = np.array([[5, 5], [5, 24], [24, 5], [24, 24], [cy, cx]], dtype=np.float32)
    np.testing.assert_allclose(t["keypoints"].numpy(), expected[None], rtol=0, atol=1e-5)
    # the center of mass of an L lies outside it
    assert pan[int(round(cy)), int(round(cx))] != 2

    mask = torch.from_numpy(pan == 2)
    assert torch.equal(t["long_offset_weights"], mask.float())
    # long-range offsets: keypoint - pixel, (dy, dx)
    assert t["long_offsets"][TR, :, 5, 5].tolist() == [0.0, 19.0]
    assert t["long_offsets"][BL, :, 5, 9].tolist() == [19.0, -4.0]
    np.testing.assert_allclose(
        t["long_offsets"][CENTER, :, 24, 24].numpy(), [cy - 24, cx - 24], atol=1e-5
    )
    assert t["long_offsets"][:, :, ~mask].abs().sum() == 0  # zero outside the instance

    # semantic target and weights: area 175 < 4096 -> weight 3
    assert torch.equal(t["sem_seg"], torch.where(mask, THING, STUFF))
    assert torch.equal(t["sem_seg_weights"], torch.where(mask, 3.0, 1.0))

    # heatmap: disks of radius 3 (29 px) around the (integer) corners, all inside the image
    for k in (TL, TR, BL, BR):
        assert int(t["heatmap"][k].sum()) == disk_count(3.0) == 29
    hm = t["heatmap"][TL]
    assert hm[5, 8] == 1 and hm[5, 9] == 0 and hm[7, 7] == 1 and hm[8, 7] == 0 and hm[2, 5] == 1
    # short-range offsets inside the disk point at the keypoint, zero outside
    assert t["short_offsets"][TL, :, 5, 8].tolist() == [0.0, -3.0]
    assert t["short_offsets"][TL, :, 7, 7].tolist() == [-2.0, -2.0]
    assert t["short_offsets"][TL, :, 8, 7].tolist() == [0.0, 0.0]
    # middle-range offsets TL -> center and center -> BR, inside the source disks
    e_tl_c = KEYPOINT_EDGES.index((TL, CENTER))
    np.testing.assert_allclose(
        t["mid_offsets"][e_tl_c, :, 6, 6].numpy(), [cy - 6, cx - 6], atol=1e-5
    )
    e_c_br = KEYPOINT_EDGES.index((CENTER, BR))
    y, x = 18, 11  # inside the disk of the center (17.71, 11.29)
    assert t["heatmap"][CENTER, y, x] == 1
    np.testing.assert_allclose(
        t["mid_offsets"][e_c_br, :, y, x].numpy(), [24 - y, 24 - x], atol=1e-5
    )
    assert t["mid_offsets"][e_c_br][:, t["heatmap"][CENTER] == 0].abs().sum() == 0
    assert torch.equal(t["heatmap_weights"], torch.ones(40, 50))


def test_ring_center_outside_mask():
    pan, segs = stuff_background(41, 41)
    yy, xx = np.mgrid[:41, :41]
    r2 = (yy - 20) ** 2 + (xx - 20) ** 2
    ring = (r2 <= 100) & (r2 > 25)
    pan[ring] = 5
    segs.append({"id": 5, "category_id": 1, "iscrowd": 0})
    t = make_gen(radius=4.0)(pan, segs)
    kps = t["keypoints"][0]
    assert kps[CENTER].tolist() == [20.0, 20.0]
    assert kps[TL].tolist() == [10.0, 10.0] and kps[BR].tolist() == [30.0, 30.0]
    assert not ring[20, 20]
    # the disk around the center covers the hole; its offsets still point at the center
    assert t["heatmap"][CENTER, 20, 20] == 1
    assert t["short_offsets"][CENTER, :, 20, 20].tolist() == [0.0, 0.0]
    assert t["short_offsets"][CENTER, :, 23, 20].tolist() == [-3.0, 0.0]
    # no long-range supervision in the hole
    assert t["long_offset_weights"][20, 20] == 0


def test_two_touching_instances_nearest_keypoint_wins():
    pan, segs = stuff_background(30, 30)
    pan[10:20, 5:15] = 2  # A
    pan[10:20, 15:25] = 3  # B, touching A, same class
    segs += [{"id": 2, "category_id": THING}, {"id": 3, "category_id": THING}]
    t = make_gen(radius=6.0, small_instance_area=100)(pan, segs)
    kps = t["keypoints"]
    assert kps.shape == (2, 5, 2)
    assert kps[0, TL].tolist() == [10.0, 5.0] and kps[1, TL].tolist() == [10.0, 15.0]
    # (10, 10) is 5 px from both top-left corners: tie -> the earlier instance (A)
    assert t["short_offsets"][TL, :, 10, 10].tolist() == [0.0, -5.0]
    # (10, 11) is 6 px from A's, 4 px from B's top-left corner: B wins
    assert t["short_offsets"][TL, :, 10, 11].tolist() == [0.0, 4.0]
    e = KEYPOINT_EDGES.index((TL, CENTER))
    assert t["mid_offsets"][e, :, 10, 11].tolist() == [14.5 - 10, 19.5 - 11]
    assert t["mid_offsets"][e, :, 10, 10].tolist() == [14.5 - 10, 9.5 - 10]
    # long-range offsets follow the pixel's own instance across the shared edge
    assert t["long_offsets"][CENTER, :, 15, 14].tolist() == [14.5 - 15, 9.5 - 14]
    assert t["long_offsets"][CENTER, :, 15, 15].tolist() == [14.5 - 15, 19.5 - 15]
    # area 100 is not < 100: weight 1
    assert t["sem_seg_weights"][15, 14] == 1.0


def test_instance_cut_by_border_clips_disks():
    pan, segs = stuff_background(20, 20)
    pan[0:8, 0:10] = 4
    segs.append({"id": 4, "category_id": 2})
    t = make_gen(radius=3.0)(pan, segs)
    assert t["keypoints"][0, TL].tolist() == [0.0, 0.0]
    # only the quarter disk with dy, dx >= 0 is inside the image: 4 + 3 + 3 + 1 = 11 px
    assert int(t["heatmap"][TL].sum()) == 11
    assert int(t["heatmap"][TR].sum()) == 4 + 3 * 2 + 3 * 2 + 1 * 2 + 0  # (0, 9): half disk


def test_crowd_and_void_are_ignored():
    pan, segs = stuff_background(30, 30)
    pan[0:10, 0:10] = 7  # crowd of things
    pan[20:30, 20:30] = 0  # void
    pan[12:16, 12:16] = 8
    segs += [{"id": 7, "category_id": THING, "iscrowd": 1}, {"id": 8, "category_id": THING}]
    t = make_gen(radius=3.0)(pan, segs)
    crowd, void = pan == 7, pan == 0
    assert t["keypoints"].shape == (1, 5, 2)  # the crowd has no keypoints
    assert (t["sem_seg"].numpy()[crowd] == IGNORE).all() and (
        t["sem_seg"].numpy()[void] == IGNORE
    ).all()
    assert (t["sem_seg_weights"].numpy()[crowd | void] == 0).all()
    hw = t["heatmap_weights"].numpy()
    assert (hw[crowd] == 0).all() and (hw[void] == 0).all() and (hw[~(crowd | void)] == 1).all()
    assert t["long_offset_weights"].sum() == 16
    # void kept in the heatmap loss when asked
    t2 = make_gen(radius=3.0, ignore_void_in_heatmap=False)(pan, segs)
    hw2 = t2["heatmap_weights"].numpy()
    assert (hw2[void] == 1).all() and (hw2[crowd] == 0).all()


def test_image_without_instances():
    pan, segs = stuff_background(16, 24)
    t = make_gen()(pan, segs)
    assert t["keypoints"].shape == (0, 5, 2)
    assert t["heatmap"].shape == (5, 16, 24) and t["heatmap"].sum() == 0
    assert t["short_offsets"].shape == (5, 2, 16, 24) and t["mid_offsets"].shape == (8, 2, 16, 24)
    assert t["long_offset_weights"].sum() == 0
    assert (t["sem_seg"] == STUFF).all()
    # an empty annotation (all void) is valid too
    t = make_gen()(np.zeros((8, 8), dtype=np.int64), [])
    assert (t["sem_seg"] == IGNORE).all() and t["heatmap_weights"].sum() == 0


def test_dtypes_and_bad_input():
    pan, segs = l_shape()
    t = make_gen()(pan, segs)
    assert t["sem_seg"].dtype == torch.int64
    for k in (
        "sem_seg_weights",
        "heatmap",
        "heatmap_weights",
        "short_offsets",
        "mid_offsets",
        "long_offsets",
    ):
        assert t[k].dtype == torch.float32, k
    with pytest.raises(ValueError, match="panoptic must be"):
        make_gen()(pan[None], segs)
    with pytest.raises(ValueError, match="keypoint_radius"):
        make_gen(radius=0)
    with pytest.raises(ValueError, match="empty mask"):
        instance_keypoints(np.zeros((3, 3), bool))
