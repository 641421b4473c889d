"""The fast paths of the post-processing give exactly what the straightforward formulas give.

Each function below is compared with a plain (slow, obviously right) reference written here:
the one-pass semantic argmax with NaN/inf, the histogram + lookup-table fusion, the sparse
long-range votes against the dense Hough-voting op, the pixel assignment on strided inputs.
Torch only, small maps (no timing here: ``benchmarks/bench_postprocess.py``).
"""

import dataclasses
import math

import pytest
import torch
from conftest import post_process_cfg

from deeperlab_d2.layers import hough_voting
from deeperlab_d2.layers.post_processing import (
    _transpose_pairs,
    assign_pixels,
    fuse_panoptic,
    hough_score_maps,
    long_range_votes,
    mask_nonfinite_logits,
    refine_long_offsets,
    semantic_labels,
)

NAN, INF = float("nan"), float("inf")


def reference_semantic_labels(logits):
    finite = torch.isfinite(logits)
    labels = torch.where(finite, logits, float("-inf")).argmax(1)
    return torch.where(finite.any(1), labels, -1)


def reference_fuse(semantic, instance_map, instance_scores, thing_ids, num_classes, cfg):
    """The fusion written with boolean maps and per-instance loops."""
    is_thing = torch.zeros(num_classes, dtype=torch.bool)
    is_thing[list(thing_ids)] = True
    labeled = semantic >= 0
    segments, panoptic = [], torch.zeros(semantic.shape, dtype=torch.int32)
    for j in instance_scores.argsort(descending=True).tolist():
        mine = (instance_map == j) & labeled
        classes = semantic[mine & is_thing[semantic.clamp(min=0)]]
        area = classes.numel()
        if area == 0 or area < cfg.thing_area:
            continue
        votes = torch.bincount(classes, minlength=num_classes)
        seg = {"id": len(segments) + 1, "category_id": int(votes.argmax()), "isthing": True}
        segments.append({**seg, "score": float(instance_scores[j]), "area": area})
        panoptic[mine] = seg["id"]
    for c in range(num_classes):
        if is_thing[c]:
            continue
        mine = (instance_map < 0) & (semantic == c)
        area = int(mine.sum())
        if area == 0 or area < cfg.stuff_area:
            continue
        seg = {"id": len(segments) + 1, "category_id": c, "isthing": False, "score": 1.0}
        segments.append({**seg, "area": area})
        panoptic[mine] = len(segments)
    return panoptic, segments


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_semantic_labels_one_pass_equals_masked_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 24)
    logits[:, :, 0, :] = 0.0  # ties: the first class wins
    logits[:, :, 1, :3] = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0])[:, None]
    clean = logits.to(dtype)
    assert torch.equal(semantic_labels(clean), reference_semantic_labels(clean))
    bad = logits.clone()
    bad[0, 1, 3, :] = NAN  # a NaN among finite logits
    bad[0, :, 4, :5] = NAN  # no finite logit
    bad[1, 2, 5, :] = INF  # +inf never wins
    bad[1, :, 6, :3] = -INF  # no finite logit
    bad[1, 3, 7, 7] = -INF  # -inf among finite logits
    bad[0, :, 8, 8] = torch.tensor([NAN, -INF, 1.0, INF, 2.0])
    bad = bad.to(dtype)
    expected = reference_semantic_labels(bad)
    assert (expected == -1).any()
    assert torch.equal(semantic_labels(bad), expected)
    # finite logits whose sum of maxima overflows take the (correct) slow path too
    huge = torch.full((1, 3, 4, 4), torch.finfo(dtype).max, dtype=dtype)
    huge[0, 1] = -1.0
    assert torch.equal(semantic_labels(huge), torch.zeros(1, 4, 4, dtype=torch.long))


def test_mask_nonfinite_logits():
    x = torch.tensor([1.0, NAN, INF, -INF, -2.0])
    low = torch.finfo(torch.float32).min
    assert torch.equal(mask_nonfinite_logits(x), torch.tensor([1.0, low, low, low, -2.0]))


@pytest.mark.parametrize("seed", range(6))
def test_fusion_equals_boolean_map_reference(seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(25):
        C = int(torch.randint(1, 7, (1,), generator=g))
        J = int(torch.randint(0, 6, (1,), generator=g))
        sem = torch.randint(-1, C, (9, 11), generator=g)
        inst = torch.randint(-1, J, (9, 11), generator=g) if J else torch.full((9, 11), -1)
        scores = torch.rand(J, generator=g)
        things = [c for c in range(C) if torch.rand(1, generator=g) < 0.5]
        cfg = post_process_cfg(thing_area=trial % 4, stuff_area=trial % 5)
        pan, segs = fuse_panoptic(sem, inst, scores, things, C, cfg)
        ref_pan, ref_segs = reference_fuse(sem, inst, scores, things, C, cfg)
        assert pan.dtype == torch.int32
        assert segs == ref_segs and torch.equal(pan, ref_pan), trial


def test_sparse_long_votes_equal_dense_vote_over_the_thing_mask():
    torch.manual_seed(1)
    N, P, H, W = 2, 5, 20, 28
    cfg = post_process_cfg(keypoint_radius=4.0, min_vote_prob=0.2, long_vote_weight=0.5)
    heat = torch.rand(N, P, H, W)
    short = torch.randn(N, P, 2, H, W) * 3
    long = torch.randn(N, P, 2, H, W) * 8
    thing = torch.rand(N, H, W) < 0.4
    fused, short_map = hough_score_maps(heat, short, long, thing, cfg)
    norm = 1.0 / (math.pi * cfg.keypoint_radius**2)
    weights = torch.where(heat >= cfg.min_vote_prob, heat, 0.0)
    ref_short = hough_voting(short, weights, (H, W)) * norm
    ones = thing[:, None].float().expand(N, P, H, W).contiguous()
    ref_fused = ref_short * cfg.short_vote_weight + hough_voting(long, ones, (H, W)) * (
        cfg.long_vote_weight * norm
    )
    assert torch.equal(short_map, ref_short)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-6, atol=1e-6)
    # no long-range votes: the short-range map times its weight
    no_long = dataclasses.replace(cfg, long_vote_weight=0.0)
    fused0, _ = hough_score_maps(heat, short, long, thing, no_long)
    assert torch.equal(fused0, ref_short * cfg.short_vote_weight)


def test_long_range_votes_are_sorted_by_map():
    kps = [torch.randn(5, 3, 2), torch.randn(5, 0, 2), torch.randn(5, 4, 2)]
    points, maps = long_range_votes(kps)
    assert points.shape == (35, 2) and maps.shape == (35,)
    assert torch.equal(
        maps,
        torch.tensor(
            [k for k in range(5) for _ in range(3)] + [10 + k for k in range(5) for _ in range(4)]
        ),
    )
    assert torch.equal(points[:3], kps[0][0]) and torch.equal(points[15:19], kps[2][0])


def test_transpose_pairs_and_assignment_on_views():
    torch.manual_seed(2)
    kps = torch.randn(5, 301, 2) * 50
    t = _transpose_pairs(kps)
    assert t.is_contiguous() and torch.equal(t, kps.transpose(0, 1))
    assert torch.equal(_transpose_pairs(kps[:, 1:]), kps[:, 1:].transpose(0, 1))
    inst = torch.randn(7, 5, 2) * 50
    a = assign_pixels(kps.transpose(0, 1), inst, chunk=64)
    b = assign_pixels(t, inst, chunk=1 << 16)
    d = ((t[:, None] - inst[None]) ** 2).sum((2, 3))
    assert torch.equal(a, b) and torch.equal(a, d.argmin(1))


def test_refinement_on_a_cropped_view_equals_the_contiguous_one():
    torch.manual_seed(3)
    long = torch.randn(5, 2, 12, 16) * 4
    short = torch.randn(5, 2, 12, 16) * 2
    ys, xs = torch.randint(0, 10, (40,)), torch.randint(0, 13, (40,))
    crop = refine_long_offsets(long[..., :10, :13], short[..., :10, :13], ys, xs, 2)
    same = refine_long_offsets(
        long[..., :10, :13].contiguous(), short[..., :10, :13].contiguous(), ys, xs, 2
    )
    assert torch.equal(crop, same)
    assert torch.equal(refine_long_offsets(long, short, ys, xs, 0), long[:, :, ys, xs])


@pytest.mark.parametrize("seed", range(3))
def test_batched_walks_and_scores_equal_the_per_type_ones(seed):
    """The batched forms used by the grouping and the keypoint search (every edge or type in
    one batch) give the values of the per-edge / per-type functions, bit for bit: the middle-
    range walks, the tap spreads and the expected-OKS masses (also on a cropped view)."""
    from deeperlab_d2.layers import post_processing as pp
    from deeperlab_d2.layers.keypoints import KEYPOINT_EDGES

    g = torch.Generator().manual_seed(seed)
    H, W, M = 30, 41, 37
    mid = torch.randn(8, 2, H, W, generator=g) * 5
    short = torch.randn(5, 2, H, W, generator=g)
    ys = torch.rand(4, M, generator=g) * (H + 6) - 3  # some points outside the image
    xs = torch.rand(4, M, generator=g) * (W + 6) - 3
    edges = [5, 0, 7, 2]
    for m, s in ((mid, short), (mid[..., 1:], short[..., 1:])):
        wy, wx = pp._follow_mid_offsets_rows(m, s, edges, ys, xs, 2)
        spread = pp._tap_spread_rows(m, edges, ys, xs)
        for r, e in enumerate(edges):
            ey, ex = pp.follow_mid_offsets(m, s, e, ys[r], xs[r], 2)
            assert torch.equal(wy[r], ey) and torch.equal(wx[r], ex)
            assert torch.equal(spread[r], pp._tap_spread(m[e], ys[r], xs[r]))
    assert len(KEYPOINT_EDGES) == mid.shape[0]
    maps = torch.rand(5, H, W, generator=g)
    types = torch.randint(0, 5, (M,), generator=g)
    mass = pp._expected_oks_typed(maps, types, ys[0], xs[0], 3.0)
    for t in range(5):
        sel = types == t
        expected = pp.expected_oks_scores(maps[t], ys[0][sel], xs[0][sel], 3.0, clip=False)
        assert torch.equal(mass[sel], expected)
