"""The fused CPU kernels of the post-processing (``csrc/postprocess_cpu.cpp``) against their
pure-PyTorch references, and the sparse rewrites of the peak search and the cell areas against
the dense formulas they replace. Torch only (no Detectron2); small maps, no timing
(``benchmarks/bench_postprocess.py``)."""

import math

import pytest
import torch
from conftest import post_process_cfg

from deeperlab_d2.layers import compiled_op_available
from deeperlab_d2.layers import post_processing as pp

NAN, INF = float("nan"), float("inf")

needs_argmax = pytest.mark.skipif(
    not compiled_op_available("cpu", "class_argmax"), reason="deeperlab_d2._C not built"
)
needs_votes = pytest.mark.skipif(
    not compiled_op_available("cpu", "keypoint_votes"), reason="deeperlab_d2._C not built"
)
needs_assign = pytest.mark.skipif(
    not compiled_op_available("cpu", "assign_pixels"), reason="deeperlab_d2._C not built"
)
needs_cells = pytest.mark.skipif(
    "cells_above" not in pp.CPU_KERNELS, reason="deeperlab_d2._C not built (or predates it)"
)
needs_fusion = pytest.mark.skipif(
    not {"panoptic_histogram", "panoptic_lookup"} <= pp.CPU_KERNELS,
    reason="deeperlab_d2._C not built (or predates it)",
)


def _random_logits(seed, shape=(2, 5, 9, 13)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    logits[:, 2] = logits[:, 1]  # ties: the first class wins
    special = torch.rand(shape, generator=g)
    logits[special < 0.05] = NAN
    logits[(special >= 0.05) & (special < 0.08)] = INF
    logits[(special >= 0.08) & (special < 0.11)] = -INF
    logits[0, :, 0, 0] = NAN  # a pixel with no finite logit: void
    logits[0, :, 0, 1] = torch.tensor([-INF, INF, NAN, -INF, -INF])
    return logits


@needs_argmax
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
def test_class_argmax_equals_semantic_labels_and_lookup(seed, layout):
    logits = _random_logits(seed)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "cropped":
        logits = _random_logits(seed, (2, 5, 12, 17))[..., 1:10, 2:15]
        logits[0, :, 0, 0] = NAN
        logits[0, :, 0, 1] = torch.tensor([-INF, INF, NAN, -INF, -INF])
    ids = [1, 3]
    labels, flagged = pp.classify_pixels(logits, ids, use_compiled=True)
    ref_labels, ref_flagged = pp.classify_pixels(logits, ids, use_compiled=False)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(flagged, ref_flagged)
    assert labels[0, 0, 0] == -1 and not flagged[0, 0, 0]
    assert labels[0, 0, 1] == -1  # +inf and NaN are not finite: no class
    expected = torch.isin(ref_labels, torch.tensor(ids))
    assert torch.equal(flagged, expected)


@needs_argmax
def test_class_argmax_edge_shapes_and_errors():
    for shape in [(0, 3, 4, 4), (1, 3, 0, 5), (1, 1, 3, 3)]:
        logits = torch.randn(shape)
        a = pp.classify_pixels(logits, [0], use_compiled=True)
        b = pp.classify_pixels(logits, [0], use_compiled=False)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(RuntimeError, match="class_argmax: logits must be float32"):
        torch.ops.deeperlab_d2.class_argmax(torch.zeros(1, 2, 3, 3).double(), torch.ones(2) > 0)
    with pytest.raises(RuntimeError, match=r"flags must be a 1-D tensor \[C\] with C = 2"):
        torch.ops.deeperlab_d2.class_argmax(torch.zeros(1, 2, 3, 3), torch.ones(3) > 0)


def _vote_inputs(seed, P=3, H=23, W=31, thing_fraction=0.4):
    """Heatmap logits (most pixels far below the vote threshold, some near it), short offsets
    pointing at a few keypoints, long offsets with noise (some pointing outside the image)."""
    g = torch.Generator().manual_seed(seed)
    heat = torch.randn(P, H, W, generator=g) * 3 - 2
    yy = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    xx = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    short = torch.empty(P, 2, H, W)
    long = torch.empty(P, 2, H, W)
    for k in range(P):
        ky, kx = torch.rand(2, generator=g) * torch.tensor([H - 1.0, W - 1.0])
        short[k, 0] = (ky - yy).clamp(-6, 6) + torch.randn(H, W, generator=g) * 0.3
        short[k, 1] = (kx - xx).clamp(-6, 6) + torch.randn(H, W, generator=g) * 0.3
        long[k, 0] = ky - yy + torch.randn(H, W, generator=g) * 2
        long[k, 1] = kx - xx + torch.randn(H, W, generator=g) * 2
    long[0, 0, 0, :5] = -40.0  # votes far outside the image cast nothing
    long[1, 1, 3, :4] = 1e3
    mask = torch.rand(H, W, generator=g) < thing_fraction
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return heat, short, long, ys * W + xs


@needs_votes
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"refine_steps": 0},
        {"refine_steps": 3, "min_vote_prob": 0.5},
        {"long_vote_weight": 0.0},
        {"short_vote_weight": 0.5, "long_vote_weight": 2.0, "keypoint_radius": 3.5},
        {"min_vote_prob": 0.0},
    ],
)
def test_keypoint_votes_kernel_equals_reference(seed, overrides):
    cfg = post_process_cfg(**{"keypoint_radius": 4.0, **overrides})
    heat, short, long, pixels = _vote_inputs(seed)
    fused, short_map, kps = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=True)
    ref = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=False)
    # the refined keypoints: the same float32 operations in the same order, bit-equal
    assert torch.equal(kps, ref[2])
    # the maps: the same taps, summed in another order
    scale = float(ref[0].abs().max()) + 1e-12
    torch.testing.assert_close(fused, ref[0], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(short_map, ref[1], rtol=1e-5, atol=1e-6 * scale)
    assert fused.shape == short_map.shape == heat.shape
    assert kps.shape == (pixels.numel(), heat.shape[0], 2)


@needs_votes
def test_keypoint_votes_kernel_pixels_in_any_order():
    """The pixels' rows are tracked from pixel to pixel (row-major lists need no division): in
    any order, with repeats and jumps back, each pixel gets the keypoints it gets in order."""
    cfg = post_process_cfg(keypoint_radius=4.0)
    heat, short, long, pixels = _vote_inputs(1, H=37, W=23)
    g = torch.Generator().manual_seed(0)
    shuffled = torch.cat([pixels[torch.randperm(pixels.numel(), generator=g)], pixels[:9]])
    shuffled = torch.cat([shuffled, torch.tensor([0, 37 * 23 - 1, 22, 23, 22])])
    _, _, kps = pp.keypoint_votes(heat, short, long, shuffled, cfg, use_compiled=True)
    ref = pp.keypoint_votes(heat, short, long, shuffled, cfg, use_compiled=False)[2]
    assert torch.equal(kps, ref)
    _, _, in_order = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=True)
    position = {int(p): i for i, p in enumerate(pixels)}
    for i, p in enumerate(shuffled[: pixels.numel() + 9].tolist()):
        assert torch.equal(kps[i], in_order[position[p]])


@needs_votes
def test_keypoint_votes_kernel_values_by_hand():
    """One vote of each kind, checked by hand: a short vote with probability 0.5 at (2.25, 3),
    a long vote from pixel (1, 1) whose long offset (1, 2) is refined once by the short offset
    sampled at (2, 3) (= (0.25, 0)) to the keypoint (2.25, 3)."""
    P, H, W = 1, 6, 7
    heat = torch.full((P, H, W), -30.0)
    heat[0, 2, 3] = 0.0  # sigmoid = 0.5, the only pixel above min_vote_prob
    short = torch.zeros(P, 2, H, W)
    short[0, 0, 2, 3] = 0.25
    long = torch.zeros(P, 2, H, W)
    long[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    pixels = torch.tensor([1 * W + 1])
    cfg = post_process_cfg(
        keypoint_radius=1.0,
        refine_steps=1,
        min_vote_prob=0.01,
        short_vote_weight=1.0,
        long_vote_weight=1.0,
    )
    for use_compiled in (True, False):
        fused, short_map, kps = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled)
        assert kps.tolist() == [[[2.25, 3.0]]]
        norm = 1.0 / math.pi
        expected_short = torch.zeros(H, W)
        expected_short[2, 3], expected_short[3, 3] = 0.5 * 0.75 * norm, 0.5 * 0.25 * norm
        torch.testing.assert_close(short_map[0], expected_short)
        expected_long = torch.zeros(H, W)
        expected_long[2, 3], expected_long[3, 3] = 0.75 * norm, 0.25 * norm
        torch.testing.assert_close(fused[0], expected_long + expected_short)


@needs_votes
def test_keypoint_votes_kernel_edge_cases_and_errors():
    cfg = post_process_cfg(keypoint_radius=3.0)
    heat, short, long, pixels = _vote_inputs(0)
    # no thing pixel; non-finite offsets (cast nothing, sample nothing)
    short[0, :, 4, 4] = NAN
    long[1, :, 5, 5] = INF
    for pix in (pixels[:0], pixels):
        a = pp.keypoint_votes(heat, short, long, pix, cfg, use_compiled=True)
        b = pp.keypoint_votes(heat, short, long, pix, cfg, use_compiled=False)
        assert torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all()
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(a[2].isnan(), b[2].isnan())
        torch.testing.assert_close(a[2], b[2], equal_nan=True, rtol=0, atol=0)
    H, W = heat.shape[1:]
    with pytest.raises(RuntimeError, match=r"pixels must lie in \[0, H \* W\)"):
        pp.keypoint_votes(heat, short, long, torch.tensor([H * W]), cfg, use_compiled=True)
    with pytest.raises(RuntimeError, match="short_offsets and long_offsets must have shape"):
        pp.keypoint_votes(heat, short[:, :, :-1], long, pixels, cfg, use_compiled=True)


@needs_votes
@pytest.mark.parametrize("min_vote_prob", [0.01, 0.3, 0.99, 0.995, 1e-6, 1e-7, 0.0, 1.0])
def test_keypoint_votes_short_vote_screening_at_the_threshold(min_vote_prob):
    """The kernel skips the sigmoid of logits far below logit(min_vote_prob) (and lists the
    other pixels a band of rows at a time, 16-pixel chunks): every pixel at or near the
    threshold, NaN and +-inf logits, rows of only skipped, only listed and mixed chunks, and a
    width that is no multiple of 16 decide as the reference does. Zero short offsets: each
    vote lands on its own pixel, so the short map is p * norm exactly where a pixel votes."""
    P, H, W = 2, 9, 37
    lo = math.log(max(min_vote_prob, 1e-30) / max(1.0 - min_vote_prob, 1e-30))
    lo = min(max(lo, -80.0), 80.0)
    g = torch.Generator().manual_seed(0)
    heat = torch.full((P, H, W), lo - 30.0)  # row 0: nothing listed
    heat[:, 1] = lo + 5.0  # every pixel listed
    heat[:, 2:6] = lo + torch.linspace(-0.2, 0.2, 4 * W).view(4, W)  # at the threshold
    heat[:, 6] = lo + torch.randn(W, generator=g) * 0.07
    heat[:, 6, ::5] = lo - 30.0  # mixed chunks
    heat[0, 7, :3] = torch.tensor([NAN, INF, -INF])
    heat[1, 8] = torch.nextafter(torch.tensor(lo), torch.tensor(-INF))  # one ulp around it
    heat[1, 8, ::2] = torch.nextafter(torch.tensor(lo), torch.tensor(INF))
    short = torch.zeros(P, 2, H, W)
    long = torch.zeros(P, 2, H, W)
    pixels = torch.arange(0, H * W, 3)
    cfg = post_process_cfg(keypoint_radius=1.0, min_vote_prob=min_vote_prob)
    a = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=True)
    b = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=False)
    probs = torch.threshold(heat.sigmoid(), pp._float32_below(min_vote_prob), 0.0)
    votes = (probs > 0) & ~probs.isnan()
    assert torch.equal(a[1] > 0, votes)  # the same pixels vote
    assert torch.equal(b[1] > 0, votes)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("seed", range(4))
def test_sparse_peak_search_equals_dense_definition(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(2, 3, 17, 19, generator=g) ** 6
    maps[0, 0, 5, 5:8] = 0.9  # a plateau: ties are kept
    maps[1, 2, 0, 0] = 0.95  # corner and border peaks
    maps[1, 2, 16, 10] = 0.97
    for threshold in (0.0, 0.05, 0.3, 2.0):
        n, k, y, x = pp._cells_above(maps, threshold)
        assert torch.equal(torch.stack([n, k, y, x]), torch.nonzero(maps > threshold).T)
        dense = torch.nonzero((maps == pp.window_max(maps, 3)) & (maps > threshold)).T
        peaks = torch.stack(pp.local_peaks(maps, 3, threshold))
        assert torch.equal(peaks, dense)


@needs_cells
@pytest.mark.parametrize("seed", range(3))
def test_cells_above_kernel_equals_reference(seed):
    """The compiled row scan returns the cells of the pure-PyTorch one, in the same order,
    including its NaN rule (a row holding a NaN has a NaN maximum: skipped)."""
    g = torch.Generator().manual_seed(seed)
    for shape in [(2, 3, 17, 19), (1, 5, 70, 200), (1, 1, 1, 1), (1, 2, 0, 5), (1, 2, 5, 0)]:
        maps = torch.rand(shape, generator=g) ** 6
        if maps.numel() > 10:
            maps.view(-1)[3] = NAN  # row 0 of plane 0: skipped by both
            maps.view(-1)[-1] = 0.99
            maps[0, 0, -1, :] = INF
        for threshold in (0.0, 0.05, 0.3, 2.0):
            got = pp._cells_above(maps, threshold, use_compiled=True)
            ref = pp._cells_above(maps, threshold, use_compiled=False)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (shape, threshold)
    maps = torch.rand(1, 2, 9, 11, generator=g)
    got = pp._cells_above(maps[:, :, 1:, 2:], 0.5, use_compiled=True)  # a cropped view
    ref = pp._cells_above(maps[:, :, 1:, 2:], 0.5, use_compiled=False)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(RuntimeError, match="must be a float32"):
        torch.ops.deeperlab_d2.cells_above(maps.double(), 0.5)


@needs_fusion
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("J", [0, 1, 9])
def test_fusion_kernels_equal_reference(seed, J):
    """fuse_panoptic's two compiled passes (histogram, lookup) give the panoptic map and
    segments of its pure-PyTorch passes (bincount of the keys, take)."""
    g = torch.Generator().manual_seed(seed)
    H, W, C = 37, 53, 6
    sem = torch.randint(-1, C, (H, W), generator=g)
    inst = torch.randint(-1, max(J, 1), (H, W), generator=g) if J else torch.full((H, W), -1)
    inst[sem >= 3] = -1  # stuff pixels belong to no instance
    scores = torch.rand(J, generator=g)
    cfg = post_process_cfg(thing_area=5, stuff_area=20)
    got = pp.fuse_panoptic(sem, inst, scores, [0, 1, 2], C, cfg)
    ref = pp.fuse_panoptic(sem, inst, scores, [0, 1, 2], C, cfg, use_compiled=False)
    assert torch.equal(got[0], ref[0]) and got[0].dtype == ref[0].dtype == torch.int32
    assert got[1] == ref[1]
    op = torch.ops.deeperlab_d2
    with pytest.raises(RuntimeError, match="semantic labels must lie in"):
        op.panoptic_histogram(sem.clamp(min=0) + C, inst, C, J)
    with pytest.raises(RuntimeError, match="instance indices in"):
        op.panoptic_histogram(sem, inst.clamp(min=0) + J, C, J)
    with pytest.raises(RuntimeError, match="must be int64 tensors of one shape"):
        op.panoptic_lookup(sem, inst[:, 1:], torch.zeros(J + 1, C + 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="lut must be an int32"):
        op.panoptic_lookup(sem, inst, torch.zeros(J + 1, C + 1))


@pytest.mark.parametrize("seed", range(3))
def test_group_reduce_equals_scatter_reduce(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(40, 7, generator=g)
    values[3, 2] = INF
    group = torch.randint(0, 9, (40,), generator=g)  # unsorted, some groups empty
    for how, fill in (("amin", INF), ("amax", -INF)):
        got = pp._group_reduce(values, group, 10, fill, how)
        base = torch.full((10, 7), fill)
        expected = base.scatter_reduce(0, group[:, None].expand(-1, 7), values, how)
        assert torch.equal(got, expected)
    assert torch.equal(
        pp._group_reduce(values[:0], group[:0], 3, 1.5, "amin"), torch.full((3, 7), 1.5)
    )


@needs_votes
@needs_argmax
def test_whole_inference_same_with_and_without_fused_kernels(monkeypatch):
    """The panoptic result of a scene is the same whether the fused kernels or the composed
    references run."""
    import importlib

    hv = importlib.import_module("deeperlab_d2.layers.hough_voting")

    g = torch.Generator().manual_seed(0)
    H, W = 40, 48
    sem = torch.zeros(1, 3, H, W)
    sem[0, 0] = 2.0
    sem[0, 1, 5:20, 5:20] = 5.0  # one thing square
    sem[0, 1, 25:35, 28:44] = 5.0  # another
    cfg = post_process_cfg(keypoint_radius=4.0)
    heat, short, long, _ = _vote_inputs(1, P=5, H=H, W=W)
    mid = torch.randn(1, 8, 2, H, W, generator=g)
    args = (sem, heat[None], short[None], mid, long[None], [1], cfg)
    fast = pp.deeperlab_panoptic_inference(*args)[0]
    monkeypatch.setattr(hv, "_FUSED_KERNEL_DEVICE_TYPES", {k: frozenset() for k in hv._FUSED_OPS})
    monkeypatch.setattr(pp, "CPU_KERNELS", frozenset())
    assert not compiled_op_available("cpu", "keypoint_votes")
    slow = pp.deeperlab_panoptic_inference(*args)[0]
    assert fast["instance_scores"].numel() > 0 and len(fast["segments_info"]) > 0
    assert torch.equal(fast["semantic"], slow["semantic"])
    assert torch.equal(fast["panoptic"], slow["panoptic"])
    # the keypoints are sub-pixel peaks of maps equal to float32 rounding (the sub-pixel fit
    # divides differences of neighbouring cells: within a thousandth of a pixel)
    torch.testing.assert_close(
        fast["instance_keypoints"], slow["instance_keypoints"], rtol=0, atol=1e-3
    )
    torch.testing.assert_close(fast["instance_scores"], slow["instance_scores"])


def _assign_inputs(seed, T=300, J=21, H=23, W=31, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    pixel_kps = torch.rand(T, 5, 2, generator=g) * scale
    pixels = torch.randperm(H * W, generator=g)[:T].sort().values
    inst = torch.rand(J, 5, 2, generator=g) * scale
    return pixel_kps, pixels, inst


@needs_assign
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("J", [1, 7, 16, 17, 40])
def test_assign_pixels_kernel_equals_reference(seed, J):
    pk, pixels, inst = _assign_inputs(seed, J=J)
    pk[::7] = pk[3]  # pixels predicting the same keypoints
    inst[J // 2] = inst[0]  # duplicate instances: the first one wins
    pk[5, 2, 0] = NAN  # a NaN distance never wins
    got = pp.pixel_instance_map(pk, pixels, inst, (23, 31), use_compiled=True)
    ref = pp.pixel_instance_map(pk, pixels, inst, (23, 31), chunk=37, use_compiled=False)
    assert got.dtype == torch.long and got.shape == (23, 31)
    assert torch.equal(got, ref)
    flat = got.view(-1)
    others = torch.ones(23 * 31, dtype=torch.bool)
    others[pixels] = False
    assert (flat[others] == -1).all()
    # the definition, in float64 (no near-ties at this scale)
    d = ((pk.double()[:, None] - inst.double()[None]) ** 2).sum((2, 3))
    d[d.isnan()] = INF
    assert torch.equal(flat[pixels], d.argmin(1))
    assert (flat[pixels] != J // 2).all() or J // 2 == 0
    assert flat[pixels[5]] == 0  # every distance NaN: instance 0


@needs_assign
def test_assign_pixels_kernel_values_by_hand_and_far_from_origin():
    # two instances 1 px apart far from the origin, where |a|^2 - 2 a.b + |b|^2 in float32
    # loses the difference: the sum of squared differences keeps it
    base = torch.full((5, 2), 3000.0)
    inst = torch.stack([base, base + 1.0])
    pk = torch.stack([base + 0.25, base + 0.75, base + 0.5])
    got = pp.pixel_instance_map(pk, torch.tensor([0, 4, 5]), inst, (2, 3), use_compiled=True)
    assert got.tolist() == [[0, -1, -1], [-1, 1, 0]]  # a tie (0.5) goes to the first
    ref = pp.pixel_instance_map(pk, torch.tensor([0, 4, 5]), inst, (2, 3), use_compiled=False)
    assert torch.equal(got, ref)


@needs_assign
def test_assign_pixels_kernel_seeded_search_ties_and_nan_instances():
    """The kernel starts each pixel from the previous pixel's winner and skips instances whose
    first keypoint is already farther: a tie with an earlier instance still goes to the earlier
    one, and a first instance with a NaN keypoint (a NaN start) falls back to the full scan."""
    line = torch.zeros(5, 2)
    inst = torch.stack([line, line + 5.0, line + 2.0])  # keypoints at 0, 5 and 2 (y and x)
    # pixel 0: nearest instance 2 (at 2.5); pixel 1 (at 1): equidistant from 0 and 2, and
    # starts from instance 2; pixel 2 (at 4.5): instance 1, its first keypoint alone is far
    # from instance 2's, but its whole distance decides
    pk = torch.stack([line + 2.5, line + 1.0, line + 4.5])
    pixels = torch.tensor([0, 1, 2])
    got = pp.pixel_instance_map(pk, pixels, inst, (1, 3), use_compiled=True)
    assert got.tolist() == [[2, 0, 1]]
    assert torch.equal(got, pp.pixel_instance_map(pk, pixels, inst, (1, 3), use_compiled=False))
    # instance 0 has a NaN keypoint: the first pixel starts from it (NaN), never assigned to it
    inst[0, 3, 1] = NAN
    got = pp.pixel_instance_map(pk, pixels, inst, (1, 3), use_compiled=True)
    assert got.tolist() == [[2, 2, 1]]
    assert torch.equal(got, pp.pixel_instance_map(pk, pixels, inst, (1, 3), use_compiled=False))


@needs_assign
def test_assign_pixels_kernel_edge_cases_and_errors():
    pk, pixels, inst = _assign_inputs(0, T=10, J=3, H=4, W=5)
    for args in [(pk[:0], pixels[:0], inst), (pk, pixels, inst[:0])]:
        out = pp.pixel_instance_map(*args, (4, 5), use_compiled=True)
        assert torch.equal(out, torch.full((4, 5), -1)), args
        assert torch.equal(out, pp.pixel_instance_map(*args, (4, 5), use_compiled=False))
    op = torch.ops.deeperlab_d2.assign_pixels
    with pytest.raises(RuntimeError, match="pixels must lie in"):
        op(pk, pixels + 20, inst, 4, 5)
    with pytest.raises(RuntimeError, match="instance_keypoints must be a float32"):
        op(pk, pixels, inst[:, :3], 4, 5)
    with pytest.raises(RuntimeError, match="pixel_keypoints must be a float32"):
        op(pk.double(), pixels, inst, 4, 5)
    with pytest.raises(RuntimeError, match="pixels must be a 1-D int64 tensor of T = 10"):
        op(pk, pixels[:4], inst, 4, 5)


@needs_votes
@needs_assign
def test_large_outputs_reused_blocks_hold_no_stale_values():
    """Outputs of 2 MiB and more come from reused blocks (csrc/cpu_alloc.h): a call after a
    call of the same size gets the same values as the first (planes zeroed, maps filled), and
    a result stays valid while the next call runs."""
    H, W = 260, 520  # [5, H, W] float32 > 2 MiB
    heat, short, long, pixels = _vote_inputs(3, P=5, H=H, W=W)
    cfg = post_process_cfg(keypoint_radius=4.0)
    first = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=True)
    kept = [t.clone() for t in first]
    again = pp.keypoint_votes(heat, short, long, pixels, cfg, use_compiled=True)
    for a, b, c in zip(first, kept, again):
        assert torch.equal(a, b) and torch.equal(b, c)
    del first, again  # back to the cache, then reused with other contents
    other = pp.keypoint_votes(heat * 0 - 20.0, short, long, pixels, cfg, use_compiled=True)
    ref = pp.keypoint_votes(heat * 0 - 20.0, short, long, pixels, cfg, use_compiled=False)
    torch.testing.assert_close(other[0], ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(other[1], ref[1], rtol=1e-5, atol=1e-7)
    pk = torch.rand(pixels.numel(), 5, 2) * 50
    inst = torch.rand(4, 5, 2) * 50
    m1 = pp.pixel_instance_map(pk, pixels, inst, (H * 4, W), use_compiled=True)
    m2 = pp.pixel_instance_map(pk[:0], pixels[:0], inst, (H * 4, W), use_compiled=True)
    assert (m2 == -1).all() and (m1 >= 0).sum() == pixels.numel()
