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
    maps, short_maps = hough_score_maps(heat.sigmoid(), short, long, thing, CFG)
    # top-left corner (10, 10): short votes of its full disk (~1 after normalization) plus the
    # 200 long-range votes of the instance's pixels; the short-range map alone: the disk
    disk = int(t["heatmap"][0].sum())
    p = torch.sigmoid(torch.tensor(10.0))
    expected = (disk * p + 200) / (math.pi * R * R)
    torch.testing.assert_close(maps[0, 0, 10, 10], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        short_maps[0, 0, 10, 10], disk * p / (math.pi * R * R), rtol=1e-4, atol=1e-4
    )
    assert maps[0, 0, 10, 10] == maps[0, 0].max()
    (cands,) = find_keypoints(maps, CFG, short_maps)
    assert sorted(cands["type"].tolist()) == [0, 1, 2, 3, 4]
    pos = {int(k): (float(y), float(x)) for k, y, x in zip(cands["type"], cands["y"], cands["x"])}
    assert pos[0] == (10.0, 10.0) and pos[3] == (19.0, 29.0)
    assert pos[CENTER] == pytest.approx((14.5, 19.5), abs=1e-4)  # sub-pixel center
    # support scores: the heatmap probability, whatever the instance's area (no clipping);
    # corners collect their whole disk at one cell, the center (14.5, 19.5) over the 4 cells
    # 0.7 px around it, which the OKS kernel weighs exp(-0.5 / (2 sigma^2))
    corners = cands["score"][cands["type"] < CENTER]
    torch.testing.assert_close(corners, p.expand(4), atol=1e-4, rtol=0)
    center = cands["score"][cands["type"] == CENTER]
    kernel = math.exp(-0.5 / (2 * CFG.oks_sigma**2))
    torch.testing.assert_close(center, (p * kernel).expand(1), atol=1e-4, rtol=0)
    # the queue's order: the fused (short + long) expected-OKS mass, which grows with the area
    assert torch.all(cands["mass"] > 1.0) and torch.all(cands["mass"][:-1] >= cands["mass"][1:])
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


def test_cell_areas_equal_brute_force():
    from deeperlab_d2.layers.post_processing import cell_areas

    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        H, W = (int(v) for v in torch.randint(5, 50, (2,), generator=gen))
        G = int(torch.randint(1, 40, (), generator=gen))
        c = torch.rand(G, 2, generator=gen, dtype=torch.float64) * torch.tensor([H + 8.0, W + 8.0])
        c -= 4
        if trial % 2:  # integer positions: pixels on bisectors (shared) and on disk edges
            c = torch.round(c)
        keep = [i for i in range(G) if all((c[i] - c[j]).norm() >= 0.5 for j in range(i))]
        c = c[keep]
        radius = float(torch.rand((), generator=gen)) * 15 + 1
        yy, xx = torch.meshgrid(
            torch.arange(H, dtype=torch.float64),
            torch.arange(W, dtype=torch.float64),
            indexing="ij",
        )
        d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
        own = (d2 <= radius * radius) & (d2 <= d2.amin(0, keepdim=True) + 1e-9)
        assert torch.equal(cell_areas(c, radius, (H, W)), own.flatten(1).sum(1).double()), trial


def test_support_scores_independent_of_area_and_crowd():
    from deeperlab_d2.layers.post_processing import support_scores

    R, sigma = 6.0, 1.5
    H, W = 40, 60
    norm = 1.0 / (math.pi * R * R)
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")

    def short_map(kps, prob=1.0):
        # ideal short-range map: every pixel within R votes for its nearest keypoint
        kps = torch.tensor(kps, dtype=torch.float32)
        d2 = (yy[None] - kps[:, 0, None, None]) ** 2 + (xx[None] - kps[:, 1, None, None]) ** 2
        near = d2.argmin(0)
        inside = d2.amin(0) <= R * R
        m = torch.zeros(H, W)
        for j in range(len(kps)):
            m[int(kps[j, 0]), int(kps[j, 1])] = prob * float((inside & (near == j)).sum()) * norm
        return m, kps

    # alone, cut by the border, in a crowd 3 px apart: all ~1
    for kps in ([[20, 30]], [[1, 2]], [[y, x] for y in range(10, 22, 3) for x in range(10, 40, 3)]):
        m, k = short_map(kps)
        s = support_scores(m, k[:, 0], k[:, 1], R, sigma)
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    # half the probability: half the score; never above 1
    m, k = short_map([[20, 30], [20, 45]], prob=0.5)
    torch.testing.assert_close(support_scores(m, k[:, 0], k[:, 1], R, sigma), torch.full((2,), 0.5))
    # the votes 2 px off: exp(-4 / (2 sigma^2)); a hypothesis with no votes: 0
    s = support_scores(m * 2, torch.tensor([22.0, 5.0]), torch.tensor([30.0, 5.0]), R, sigma)
    torch.testing.assert_close(s, torch.tensor([math.exp(-4 / (2 * sigma**2)), 0.0]))
    # two hypotheses 0.3 px apart share the cell (a center shared by two instances)
    s, spread = support_scores(
        m * 2, torch.tensor([20.0, 20.3]), torch.tensor([30.0, 30.0]), R, sigma, True
    )
    assert s[0] > 0.999 and s[1] > 0.98 and spread[0] == 0 and abs(float(spread[1]) - 0.3) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_support_scores_of_several_types_in_one_call_equal_one_call_per_type(seed):
    """Hypotheses of several keypoint types scored in one call (``types``) get, value for value,
    what one call per type on its own map gives: crowds of one type split cells, other types
    at the same places do not; shared cells (hypotheses < 1/2 px apart), hypotheses outside the
    image, a type without hypotheses."""
    from deeperlab_d2.layers.post_processing import cell_areas, support_scores

    g = torch.Generator().manual_seed(seed)
    P, H, W, R, sigma = 4, 37, 53, 5.0, 1.5
    maps = torch.rand(P, H, W, generator=g) * 0.02
    M = 60
    types = torch.randint(0, P - 1, (M,), generator=g)  # type P - 1 has none
    ys = torch.rand(M, generator=g) * (H + 6) - 3
    xs = torch.rand(M, generator=g) * (W + 6) - 3
    ys[5], xs[5] = ys[4] + 0.2, xs[4]  # a shared cell if the types agree
    types[5] = types[4]
    ys[7], xs[7] = ys[6], xs[6]  # same place, another type: cells not shared
    types[7] = (types[6] + 1) % (P - 1)
    scores, spread = support_scores(maps, ys, xs, R, sigma, True, types)
    for t in range(P):
        sel = types == t
        if not sel.any():
            continue
        s, sp = support_scores(maps[t], ys[sel], xs[sel], R, sigma, True)
        assert torch.equal(scores[sel], s), t
        assert torch.equal(spread[sel], sp), t
    centers = torch.stack([ys, xs], 1).double()[:20]
    areas = cell_areas(centers, R, (H, W), types[:20])
    for t in range(P):
        sel = types[:20] == t
        if sel.any():
            assert torch.equal(areas[sel], cell_areas(centers[sel], R, (H, W))), t


def test_rejection_radii_scale_with_the_instance():
    from deeperlab_d2.layers.post_processing import rejection_radii

    def box(y0, x0, h, w):
        y1, x1 = y0 + h - 1, x0 + w - 1
        return [[y0, x0], [y0, x1], [y1, x0], [y1, x1], [(y0 + y1) / 2, (x0 + x1) / 2]]

    r = rejection_radii(
        torch.tensor([box(0, 0, 3, 3), box(0, 0, 21, 41), box(0, 0, 200, 200)]), 10.0
    )
    # a quarter of the distance to the nearest own keypoint (corners: the 20 px side; the
    # center: a corner), at least 1 px, at most 10 px
    assert r[0].tolist() == [1.0] * 5
    torch.testing.assert_close(r[1], torch.tensor([5.0] * 4 + [0.25 * math.hypot(10, 20)]))
    assert r[2].tolist() == [10.0] * 5
