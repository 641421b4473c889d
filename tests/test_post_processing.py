"""Post-processing stages on hand-built maps (torch only, like deeperlab_d2.layers)."""

import math

import numpy as np
import pytest
import torch
from conftest import keypoint_target_generator, post_process_cfg

from deeperlab_d2.layers.post_processing import (
    CENTER,
    KEYPOINT_EDGES,
    assign_pixels,
    bilinear_sample,
    box_nms,
    deeperlab_panoptic_inference,
    expected_oks_scores,
    find_keypoints,
    follow_mid_offsets,
    fuse_panoptic,
    hough_score_maps,
    instance_boxes,
    refine_long_offsets,
)

THING, THING2, STUFF = 0, 1, 2
R = 6.0
CFG = post_process_cfg(
    keypoint_radius=R, peak_kernel=3, oks_sigma=1.5, keypoint_nms_radius=3.0, stuff_area=10
)


def ideal(pan, segs, num_classes=3):
    """Ideal head outputs [1, ...] from a hand-built panoptic map."""
    gen = keypoint_target_generator([THING, THING2], keypoint_radius=R)
    t = gen(pan, segs)
    sem = torch.full(pan.shape, STUFF, dtype=torch.long)
    for s in segs:
        sem[torch.from_numpy(pan == s["id"])] = s["category_id"]
    logits = torch.nn.functional.one_hot(sem, num_classes).permute(2, 0, 1).float() * 10
    heat = torch.where(t["heatmap"] > 0, 10.0, -10.0)
    outs = [
        logits[None],
        heat[None],
        t["short_offsets"][None],
        t["mid_offsets"][None],
        t["long_offsets"][None],
    ]
    return outs, t


def background(h, w):
    return np.ones((h, w), np.int64), [{"id": 1, "category_id": STUFF}]


def test_bilinear_sample_exact():
    field = torch.arange(12, dtype=torch.float32).view(1, 3, 4)  # value = 4 y + x
    v = bilinear_sample(
        field, torch.tensor([1.0, 0.5, 1.25, -1.0, 2.0]), torch.tensor([2.0, 0.5, 2.5, 0.0, 3.5])
    )
    # interior points are linear in (y, x); (-1, 0) is outside; (2, 3.5) keeps half a tap
    torch.testing.assert_close(v[0], torch.tensor([6.0, 2.5, 7.5, 0.0, 11 * 0.5]))


def test_long_offset_refinement_snaps_to_keypoint():
    # short-range offsets of keypoint 0 all point at (5, 7); long offsets miss by (0.8, -0.6)
    H, W = 12, 14
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    short = torch.zeros(5, 2, H, W)
    short[0, 0], short[0, 1] = 5 - yy, 7 - xx
    long = torch.zeros(5, 2, H, W)
    long[0, 0], long[0, 1] = 5 - yy + 0.8, 7 - xx - 0.6
    ys, xs = torch.tensor([0, 11, 3]), torch.tensor([0, 13, 9])
    refined = refine_long_offsets(long, short, ys, xs, steps=1)
    torch.testing.assert_close(refined[0, 0] + ys, torch.full((3,), 5.0))
    torch.testing.assert_close(refined[0, 1] + xs, torch.full((3,), 7.0))
    unrefined = refine_long_offsets(long, short, ys, xs, steps=0)
    torch.testing.assert_close(unrefined[0, 0] + ys, torch.full((3,), 5.8))


def test_score_map_peak_and_expected_oks():
    pan, segs = background(40, 40)
    pan[10:20, 10:30] = 2
    segs.append({"id": 2, "category_id": THING})
    outs, t = ideal(pan, segs)
    sem, heat, short, mid, long = outs
    thing = sem.argmax(1) == THING
    maps = hough_score_maps(heat.sigmoid(), short, long, thing, CFG)
    # top-left corner (10, 10): short votes of its full disk (~1 after normalization) plus the
    # 200 long-range votes of the instance's pixels
    disk = int(t["heatmap"][0].sum())
    expected = (disk * torch.sigmoid(torch.tensor(10.0)) + 200) / (math.pi * R * R)
    torch.testing.assert_close(maps[0, 0, 10, 10], expected, rtol=1e-4, atol=1e-4)
    assert maps[0, 0, 10, 10] == maps[0, 0].max()
    (cands,) = find_keypoints(maps, CFG)
    assert sorted(cands["type"].tolist()) == [0, 1, 2, 3, 4]
    pos = {int(k): (float(y), float(x)) for k, y, x in zip(cands["type"], cands["y"], cands["x"])}
    assert pos[0] == (10.0, 10.0) and pos[3] == (19.0, 29.0)
    assert pos[CENTER] == pytest.approx((14.5, 19.5), abs=1e-4)  # sub-pixel center
    assert torch.all(cands["score"] == 1.0)  # clipped expected OKS
    # the expected-OKS score of a single unit vote decays as a Gaussian of the distance
    one = torch.zeros(9, 9)
    one[4, 4] = 1.0
    s = expected_oks_scores(one, torch.tensor([4.0, 4.0, 4.0]), torch.tensor([4.0, 5.0, 6.0]), 1.5)
    torch.testing.assert_close(s, torch.exp(-torch.tensor([0.0, 1.0, 4.0]) / (2 * 1.5**2)))


def test_corner_candidate_whose_center_lies_outside_the_mask():
    # an L whose center of mass is outside it; start from its top-left corner only
    pan, segs = background(40, 40)
    pan[5:25, 5:10] = 2
    pan[20:25, 5:30] = 2
    segs.append({"id": 2, "category_id": THING})
    outs, t = ideal(pan, segs)
    mid, short = outs[3][0], outs[2][0]
    kps = t["keypoints"][0]
    assert pan[int(kps[CENTER, 0]), int(kps[CENTER, 1])] != 2
    cy, cx = follow_mid_offsets(
        mid, short, KEYPOINT_EDGES.index((0, CENTER)), torch.tensor([5.0]), torch.tensor([5.0]), 2
    )
    torch.testing.assert_close(torch.stack([cy, cx], 1)[0], kps[CENTER], atol=1e-4, rtol=0)
    (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert res["instance_keypoints"].shape[0] == 1
    torch.testing.assert_close(res["instance_keypoints"][0], kps, atol=1e-3, rtol=0)
    assert torch.equal(res["instance_map"] == 0, torch.from_numpy(pan == 2))


def test_two_instances_whose_boxes_overlap():
    # two diagonal L-shapes interleaved so that their boxes overlap (box IoU ~0.27)
    pan, segs = background(48, 48)
    pan[5:30, 5:9] = 2
    pan[26:30, 5:30] = 2
    pan[15:40, 36:40] = 3
    pan[15:19, 15:40] = 3
    segs += [{"id": 2, "category_id": THING}, {"id": 3, "category_id": THING2}]
    outs, t = ideal(pan, segs)
    (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert res["instance_keypoints"].shape[0] == 2
    pred, info = res["panoptic"].numpy(), res["segments_info"]
    by_class = {s["category_id"]: s for s in info}
    assert by_class[THING]["isthing"] and by_class[THING2]["isthing"]
    assert np.array_equal(pred == by_class[THING]["id"], pan == 2)
    assert np.array_equal(pred == by_class[THING2]["id"], pan == 3)
    assert np.array_equal(pred == by_class[STUFF]["id"], pan == 1)
    assert by_class[THING]["area"] == int((pan == 2).sum())


def test_image_without_things():
    pan, segs = background(20, 30)
    pan[:, 20:] = 4
    segs.append({"id": 4, "category_id": 3})
    outs, _ = ideal(pan, segs, num_classes=4)
    (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert res["instance_keypoints"].shape == (0, 5, 2)
    assert [s["isthing"] for s in res["segments_info"]] == [False, False]
    assert (res["panoptic"] > 0).all()
    # an empty prediction: all-thing semantics but no keypoint evidence -> all void
    outs[0] = torch.zeros_like(outs[0])
    outs[0][:, THING] = 10.0
    outs[1] = torch.full_like(outs[1], -10.0)
    (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert res["segments_info"] == [] and (res["panoptic"] == 0).all()


def test_batched_equals_single_and_image_sizes():
    pan, segs = background(32, 40)
    pan[4:12, 4:20] = 2
    pan[14:30, 22:36] = 3
    segs += [{"id": 2, "category_id": THING}, {"id": 3, "category_id": THING}]
    outs, _ = ideal(pan, segs)
    pan2, segs2 = background(32, 40)
    pan2[10:20, 10:20] = 5
    segs2.append({"id": 5, "category_id": THING2})
    outs2, _ = ideal(pan2, segs2)
    batch = [torch.cat([a, b]) for a, b in zip(outs, outs2)]
    res = deeperlab_panoptic_inference(*batch, [THING, THING2], CFG)
    single = [deeperlab_panoptic_inference(*o, [THING, THING2], CFG)[0] for o in (outs, outs2)]
    for r, s in zip(res, single):
        assert torch.equal(r["panoptic"], s["panoptic"])
        assert r["segments_info"] == s["segments_info"]
    # image_sizes crops the padding of each image before processing
    cropped = deeperlab_panoptic_inference(*batch, [THING, THING2], CFG, [(32, 40), (24, 30)])
    assert cropped[1]["panoptic"].shape == (24, 30)
    assert torch.equal(cropped[0]["panoptic"], single[0]["panoptic"])


def test_box_nms_and_boxes():
    kps = torch.tensor(
        [
            [[0, 0], [0, 9], [9, 0], [9, 9], [4.5, 4.5]],
            [[1, 1], [1, 9], [9, 1], [9, 9], [5, 5]],
            [[20, 20], [20, 29], [29, 20], [29, 29], [25, 25]],
        ],
        dtype=torch.float32,
    )
    boxes = instance_boxes(kps)
    assert boxes[0].tolist() == [0, 0, 9, 9]
    keep = box_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.7)  # IoU(0, 1) = 81 / 100
    assert keep.tolist() == [1, 2]
    assert box_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.9).tolist() == [1, 2, 0]


def test_assign_pixels_chunked_and_exact():
    torch.manual_seed(0)
    inst = torch.rand(7, 5, 2) * 100
    noise = torch.randn(1000, 5, 2) * 0.5
    truth = torch.randint(0, 7, (1000,))
    pix = inst[truth] + noise
    assert torch.equal(assign_pixels(pix, inst, chunk=1 << 16), truth)
    assert torch.equal(assign_pixels(pix, inst, chunk=37), truth)


def test_fuse_majority_vote_and_areas():
    semantic = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 2], [2, 2, 2, 2]])
    instance_map = torch.tensor([[0, 0, 1, -1], [0, 1, 1, -1], [-1, -1, -1, -1]])
    cfg = post_process_cfg(stuff_area=6, thing_area=0)
    pan, info = fuse_panoptic(semantic, instance_map, torch.tensor([0.3, 0.8]), [0, 1], 3, cfg)
    # instance 1 has the higher score: id 1; class = majority (3 x class 1)
    assert info[0] == {
        "id": 1,
        "category_id": 1,
        "isthing": True,
        "score": pytest.approx(0.8),
        "area": 3,
    }
    assert info[1]["category_id"] == 0 and info[1]["area"] == 3
    assert info[2] == {"id": 3, "category_id": 2, "isthing": False, "score": 1.0, "area": 6}
    assert pan.tolist() == [[2, 2, 1, 3], [2, 1, 1, 3], [3, 3, 3, 3]]
    pan, info = fuse_panoptic(
        semantic,
        instance_map,
        torch.tensor([0.3, 0.8]),
        [0, 1],
        3,
        post_process_cfg(stuff_area=6, thing_area=4),
    )
    assert [s["isthing"] for s in info] == [False] and (pan[:2, :3] == 0).all()


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_window_max_equals_max_pool(kernel):
    from deeperlab_d2.layers.post_processing import window_max

    torch.manual_seed(kernel)
    maps = torch.randn(2, 3, 9, 13)
    expected = torch.nn.functional.max_pool2d(maps, kernel, 1, kernel // 2)
    assert torch.equal(window_max(maps, kernel), expected)
    tiny = torch.randn(1, 1, 2, 1)
    assert torch.equal(
        window_max(tiny, kernel), torch.nn.functional.max_pool2d(tiny, kernel, 1, kernel // 2)
    )
