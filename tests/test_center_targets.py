"""Exact Panoptic-DeepLab center targets on hand-built maps, and agreement with Detectron2's
own ``PanopticDeepLabTargetGenerator`` on random scenes."""

import numpy as np
import pytest
import torch

from deeperlab_d2.data.center_target_generator import CenterTargetGenerator
from deeperlab_d2.data.semantic_targets import semantic_targets

THING, STUFF, IGNORE = 0, 3, 255


def make_gen(sigma=2.0, **kw):
    kw = {"small_instance_area": 4096, "small_instance_weight": 3.0, **kw}
    return CenterTargetGenerator(ignore_label=IGNORE, thing_ids=[THING, 1], sigma=sigma, **kw)


def test_l_shape_center_outside_the_mask():
    pan = np.ones((30, 40), np.int64)  # id 1: stuff
    pan[5:20, 5:10] = 2  # 75 px
    pan[20:25, 5:25] = 2  # 100 px
    pan[0, :] = 0  # void row
    segs = [{"id": 1, "category_id": STUFF}, {"id": 2, "category_id": THING, "iscrowd": 0}]
    t = make_gen(sigma=2.0)(pan, segs)
    cy, cx = 3100 / 175, 1975 / 175  # by hand
    np.testing.assert_allclose(t["centers"].numpy(), [[cy, cx]], atol=1e-5)
    mask = torch.from_numpy(pan == 2)
    assert torch.equal(t["center_offset_weights"], mask.float())
    np.testing.assert_allclose(
        t["center_offsets"][:, 24, 24].numpy(), [cy - 24, cx - 24], atol=1e-5
    )
    assert t["center_offsets"][:, ~mask].abs().sum() == 0
    # Gaussian peak 1 at the rounded center (18, 11), exp(-1/(2 sigma^2)) one pixel away
    heat = t["center_heatmap"][0]
    assert heat[18, 11] == 1.0 and heat.argmax() == 18 * 40 + 11
    assert heat[18, 12].item() == pytest.approx(np.exp(-1 / 8), rel=1e-6)
    # window |d| <= ceil(3 sigma) + 1 = 7: zero beyond
    assert heat[18, 11 + 7] > 0 and heat[18, 11 + 8] == 0
    assert torch.equal(t["center_weights"], torch.from_numpy(pan != 0).float())
    assert torch.equal(
        t["sem_seg_weights"], torch.where(mask, 3.0, (torch.from_numpy(pan) != 0).float())
    )


def test_crowd_and_overlapping_gaussians():
    pan = np.zeros((20, 30), np.int64)
    pan[2:5, 2:5] = 1  # thing, center (3, 3)
    pan[2:5, 6:9] = 2  # thing, center (3, 7)
    pan[10:15, 10:20] = 3  # crowd thing: no center, no offsets, weights 0
    segs = [
        {"id": 1, "category_id": THING},
        {"id": 2, "category_id": 1},
        {"id": 3, "category_id": THING, "iscrowd": 1},
    ]
    t = make_gen(sigma=1.0)(pan, segs)
    assert t["centers"].tolist() == [[3.0, 3.0], [3.0, 7.0]]
    heat = t["center_heatmap"][0]
    # midway pixel (3, 5): both Gaussians give exp(-4/2); the maximum, not the sum
    assert heat[3, 5].item() == pytest.approx(np.exp(-2.0), rel=1e-6)
    crowd = torch.from_numpy(pan == 3)
    assert heat[crowd].sum() == 0 and t["center_weights"][crowd].sum() == 0
    assert t["center_offset_weights"][crowd].sum() == 0
    assert (t["sem_seg"][crowd] == IGNORE).all()


def test_no_instances():
    pan = np.ones((8, 9), np.int64)
    t = make_gen()(pan, [{"id": 1, "category_id": STUFF}])
    assert t["centers"].shape == (0, 2) and t["center_heatmap"].sum() == 0
    assert t["center_offset_weights"].sum() == 0 and (t["sem_seg"] == STUFF).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_detectron2_target_generator(seed):
    from detectron2.projects.panoptic_deeplab.target_generator import (
        PanopticDeepLabTargetGenerator,
    )

    rng = np.random.default_rng(seed)
    H, W = 61 + seed, 83
    pan = np.zeros((H, W), np.int64)
    segs = []
    for i in range(1, 12):  # random rectangles and discs, later ones on top
        y, x = rng.integers(0, H), rng.integers(0, W)
        h, w = rng.integers(2, 25, size=2)
        if i % 2:
            pan[y : y + h, x : x + w] = i
        else:
            yy, xx = np.mgrid[:H, :W]
            pan[(yy - y) ** 2 + (xx - x) ** 2 <= h * h] = i
        segs.append({"id": i, "category_id": int(rng.integers(0, 5)), "iscrowd": 0})
    segs = [s for s in segs if (pan == s["id"]).any()]
    ours = CenterTargetGenerator(
        ignore_label=IGNORE,
        thing_ids=[0, 1],
        sigma=8,
        small_instance_area=100,
        small_instance_weight=3.0,
    )(pan, segs)
    theirs = PanopticDeepLabTargetGenerator(
        IGNORE,
        [0, 1],
        sigma=8,
        ignore_stuff_in_offset=True,
        small_instance_area=100,
        small_instance_weight=3,
        ignore_crowd_in_semantic=True,
    )(pan, segs)
    assert torch.equal(ours["center_heatmap"][0], theirs["center"])
    # Detectron2 subtracts float32 pixel coordinates: equal up to float32 rounding
    torch.testing.assert_close(ours["center_offsets"], theirs["offset"], rtol=0, atol=1e-5)
    assert torch.equal(ours["center_offset_weights"], theirs["offset_weights"][0])
    assert torch.equal(ours["center_weights"], theirs["center_weights"][0])
    assert torch.equal(ours["sem_seg"], theirs["sem_seg"])
    labelled = ours["sem_seg"] != IGNORE  # Detectron2 leaves weight 1 on void
    assert torch.equal(ours["sem_seg_weights"][labelled], theirs["sem_seg_weights"][labelled])
    np.testing.assert_allclose(
        ours["centers"].numpy(), np.array(theirs["center_points"]), atol=1e-4
    )


def test_semantic_targets_small_and_crowd():
    pan = np.array([[1, 1, 2], [3, 3, 0]])
    segs = [
        {"id": 1, "category_id": THING},
        {"id": 2, "category_id": STUFF},
        {"id": 3, "category_id": THING, "iscrowd": 1},
        {"id": 9, "category_id": STUFF},  # listed, absent
    ]
    sem, w = semantic_targets(pan, segs, IGNORE, [THING], 3, 5.0)
    assert sem.tolist() == [[THING, THING, STUFF], [IGNORE, IGNORE, IGNORE]]
    assert w.tolist() == [[5.0, 5.0, 1.0], [0.0, 0.0, 0.0]]
