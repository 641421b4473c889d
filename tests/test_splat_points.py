"""splat_points, the sparse entry point of the Hough voting: exact values, compiled op vs. the
PyTorch reference, agreement with the dense hough_voting, op registration, bad inputs.

Needs only torch (no Detectron2). Tests of the compiled op skip when ``deeperlab_d2._C`` is not
built; the CUDA variants skip when no GPU is visible (checked at test time, never at import).
"""

import contextlib
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from test_hough_voting import (
    CUDA,
    DEVICES,
    IMPLS,
    NOT_BUILT,
    SCALES,
    force_int64_indexing,
    hv_module,
    num_threads,
    random_inputs,
    require_free_gpu_memory,
    single_tap_inputs,
    summation_tolerance,
)
from torch.utils._python_dispatch import TorchDispatchMode

from deeperlab_d2.layers import (
    ReferenceFallbackWarning,
    compiled_op_available,
    hough_voting,
    splat_points,
    splat_points_reference,
)

HAS_SPLAT_OP = compiled_op_available("cpu", op="splat_points")
needs_op = pytest.mark.skipif(not HAS_SPLAT_OP, reason=NOT_BUILT)


def available(device):
    return compiled_op_available(device, op="splat_points")


def run_impl(impl, points, weights, map_index, num_maps, out_size, scale=1.0):
    """Runs one implementation, skipping the compiled one where it has no kernel."""
    if impl == "reference":
        return splat_points_reference(points, weights, map_index, num_maps, out_size, scale)
    if not available(points.device):
        pytest.skip(f"compiled splat_points not built for {points.device.type}: {NOT_BUILT}")
    return splat_points(points, weights, map_index, num_maps, out_size, scale, use_compiled=True)


def raw_op(points, weights, map_index, num_maps, out_size, scale=1.0):
    return torch.ops.deeperlab_d2.splat_points(
        points, weights, map_index, num_maps, *out_size, scale
    )


def make_points(votes, device="cpu"):
    """(points [M, 2], weights [M], map_index [M]) from (map, y, x, weight) tuples."""
    points = torch.tensor([[y, x] for _, y, x, _ in votes], dtype=torch.float32).view(-1, 2)
    weights = torch.tensor([w for *_, w in votes], dtype=torch.float32)
    map_index = torch.tensor([m for m, *_ in votes], dtype=torch.int64)
    return points.to(device), weights.to(device), map_index.to(device)


def dense_to_points(offsets, weights, keep=None):
    """The votes of a dense [N, K, 2, H, W] field as points: (y + dy, x + dx) in float32 (the
    rounding hough_voting does), map n * K + k, optionally only where ``keep`` [N, K, H, W]."""
    n, k, _, h, w = offsets.shape
    ys = torch.arange(h, dtype=torch.float32, device=offsets.device).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=offsets.device).view(1, w)
    points = torch.stack([ys + offsets[:, :, 0], xs + offsets[:, :, 1]], dim=-1)  # [N,K,H,W,2]
    maps = torch.arange(n * k, device=offsets.device).view(n, k, 1, 1).expand(n, k, h, w)
    if keep is None:
        return points.reshape(-1, 2), weights.reshape(-1), maps.reshape(-1)
    return points[keep], weights[keep], maps[keep]


def splat_tolerance(points, weights, map_index, num_maps, out_size, scale=1.0):
    """Per-cell bound on the float32 summation-order error (see summation_tolerance)."""
    valid = torch.isfinite(weights) & (weights != 0)
    args = (points,)
    rest = (map_index, num_maps, out_size, scale)
    mass = splat_points_reference(*args, torch.where(valid, weights.abs(), 0.0), *rest)
    count = splat_points_reference(*args, valid.float(), *rest)
    return 8 * torch.finfo(torch.float32).eps * mass * (count + 1).sqrt()


def assert_within(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    excess = (out - ref).abs() - tol
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max().item() <= 0, (
        f"{int((excess > 0).sum())} cells differ beyond the summation-order bound; worst at flat "
        f"index {worst}: out={out.flatten()[worst].item()}, ref={ref.flatten()[worst].item()}, "
        f"tol={tol.flatten()[worst].item()}"
    )


def random_points(m, num_maps, out_size, scale, seed, device="cpu", sort=False):
    """m points spread over (and beyond) the grid, clustered around one centre per map in part,
    sprinkled with NaN/inf/huge coordinates and NaN/inf/zero/negative weights."""
    gen = torch.Generator().manual_seed(seed)
    oh, ow = out_size
    extent = torch.tensor([(oh + 2) / scale, (ow + 2) / scale])
    map_index = torch.randint(max(num_maps, 1), (m,), generator=gen)
    if sort:
        map_index = map_index.sort().values
    points = torch.rand(m, 2, generator=gen) * extent - 1.5 / scale
    centres = torch.rand(max(num_maps, 1), 2, generator=gen) * extent * 0.8
    clustered = torch.rand(m, generator=gen) < 0.5
    near = centres[map_index] + torch.randn(m, 2, generator=gen) * 1.5
    points = torch.where(clustered[:, None], near, points)
    weights = torch.rand(m, generator=gen)

    def sprinkle(t, values, frac):
        mask = torch.rand(t.shape, generator=gen) < frac
        choice = torch.randint(len(values), t.shape, generator=gen)
        return torch.where(mask, torch.tensor(values)[choice], t)

    points = sprinkle(points, [math.nan, math.inf, -math.inf, 1e4, -1e4, 1e30], 0.02)
    weights = sprinkle(weights, [math.nan, math.inf, -math.inf, 0.0, -0.5], 0.03)
    return points.to(device), weights.to(device), map_index.to(device)


# ------------------------------------------------------------------------------------------
# exact values on hand-built points (both implementations, every device)
# ------------------------------------------------------------------------------------------
@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.mark.parametrize("device", DEVICES)
class TestExactValues:
    def test_integer_position_lands_in_one_cell(self, impl, device):
        pts, w, mi = make_points([(1, 3.0, 1.0, 0.7)], device)
        out = run_impl(impl, pts, w, mi, 2, (6, 6))
        expected = torch.zeros(2, 6, 6)
        expected[1, 3, 1] = 0.7
        assert out.shape == (2, 6, 6) and out.dtype == torch.float32
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)

    def test_fractional_position_splits_bilinearly(self, impl, device):
        pts, w, mi = make_points([(0, 1.5, 2.25, 2.0)], device)
        out = run_impl(impl, pts, w, mi, 1, (4, 5)).cpu()[0]
        expected = torch.zeros(4, 5)
        expected[1, 2] = 0.5 * 0.75 * 2
        expected[1, 3] = 0.5 * 0.25 * 2
        expected[2, 2] = 0.5 * 0.75 * 2
        expected[2, 3] = 0.5 * 0.25 * 2
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_points_accumulate_and_maps_do_not_mix(self, impl, device):
        votes = [
            (0, 2.0, 2.0, 0.25),
            (0, 2.0, 2.0, 0.5),
            (2, 1.0, 1.5, 1.0),
            (2, 1.0, 2.5, 1.0),
            (1, 0.0, 0.0, 3.0),
        ]
        pts, w, mi = make_points(votes, device)
        out = run_impl(impl, pts, w, mi, 4, (4, 4)).cpu()
        expected = torch.zeros(4, 4, 4)
        expected[0, 2, 2] = 0.75
        expected[2, 1, 1] = 0.5
        expected[2, 1, 2] = 1.0
        expected[2, 1, 3] = 0.5
        expected[1, 0, 0] = 3.0
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_scale(self, impl, device):
        # (6, 7) * 0.5 = (3, 3.5); (1.25, 1) * 2 = (2.5, 2)
        pts, w, mi = make_points([(0, 6.0, 7.0, 1.0), (1, 1.25, 1.0, 1.0)], device)
        out = run_impl(impl, pts, w, mi, 2, (5, 5), scale=0.5).cpu()
        assert out[0, 3, 3] == 0.5 and out[0, 3, 4] == 0.5 and out[0].sum() == 1.0
        out = run_impl(impl, pts, w, mi, 2, (6, 6), scale=2.0).cpu()
        expected = torch.zeros(6, 6)
        expected[2, 2] = 0.5
        expected[3, 2] = 0.5
        torch.testing.assert_close(out[1], expected, rtol=0, atol=0)

    def test_point_partly_outside_keeps_in_grid_taps(self, impl, device):
        votes = [
            (0, -0.5, 1.0, 1.0),  # only row 0 keeps 0.5
            (0, 3.5, 4.75, 1.0),  # 4x5 grid: only (3, 4) keeps .5 * .25
            (0, 2.0, -0.25, 1.0),  # only column 0 keeps 0.75
        ]
        pts, w, mi = make_points(votes, device)
        out = run_impl(impl, pts, w, mi, 1, (4, 5)).cpu()[0]
        expected = torch.zeros(4, 5)
        expected[0, 1] = 0.5
        expected[3, 4] = 0.125
        expected[2, 0] = 0.75
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_point_completely_outside_casts_nothing(self, impl, device):
        votes = [
            (0, -1.0, 2.0, 1.0),
            (0, -5.0, 1.0, 1.0),
            (0, 1.0, 5.0, 1.0),  # column 5 = out_w
            (0, 4.0, 1.0, 1.0),  # row 4 = out_h
            (0, 1e4, -1e4, 1.0),
            (0, 3e38, 3e38, 1.0),
        ]
        pts, w, mi = make_points(votes, device)
        out = run_impl(impl, pts, w, mi, 1, (4, 5))
        assert torch.count_nonzero(out).item() == 0

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite_points_and_weights_cast_nothing(self, impl, device, bad):
        votes = [
            (0, bad, 1.0, 1.0),
            (0, 1.0, bad, 1.0),
            (0, bad, bad, 1.0),
            (1, 1.0, 1.0, bad),
            (1, 1.0, 1.0, 0.0),
            (1, 2.5, 2.5, 1.0),  # the one valid point
        ]
        pts, w, mi = make_points(votes, device)
        out = run_impl(impl, pts, w, mi, 2, (4, 4)).cpu()
        expected = torch.zeros(2, 4, 4)
        expected[1, 2:4, 2:4] = 0.25
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    @pytest.mark.parametrize(
        "m, num_maps, out_size",
        [(0, 3, (4, 5)), (0, 0, (4, 5)), (3, 2, (0, 5)), (3, 2, (4, 0)), (0, 2, (0, 0))],
    )
    def test_zero_size(self, impl, device, m, num_maps, out_size):
        pts = torch.ones(m, 2, device=device)
        w = torch.ones(m, device=device)
        mi = torch.zeros(m, dtype=torch.int64, device=device)
        out = run_impl(impl, pts, w, mi, num_maps, out_size)
        assert out.shape == (num_maps, *out_size) and out.dtype == torch.float32
        assert torch.count_nonzero(out).item() == 0

    def test_all_weights_zero(self, impl, device):
        pts, _, mi = random_points(500, 3, (9, 11), 1.0, seed=2, device=device)
        out = run_impl(impl, pts, torch.zeros(500, device=device), mi, 3, (9, 11))
        assert out.shape == (3, 9, 11) and torch.count_nonzero(out).item() == 0

    def test_non_contiguous_inputs(self, impl, device):
        gen = torch.Generator().manual_seed(4)
        pts = (torch.rand(2, 300, generator=gen) * 12 - 1).to(device).t()  # [300, 2] strided
        w = torch.rand(300, 2, generator=gen)[:, 1].to(device)
        mi = torch.randint(3, (300, 2), generator=gen)[:, 0].to(device)
        assert not (pts.is_contiguous() or w.is_contiguous() or mi.is_contiguous())
        out = run_impl(impl, pts, w, mi, 3, (10, 10))
        ref = splat_points_reference(pts.contiguous(), w.contiguous(), mi.contiguous(), 3, (10, 10))
        assert_within(out, ref, splat_tolerance(pts, w, mi, 3, (10, 10)))


# ------------------------------------------------------------------------------------------
# compiled op vs. reference on random inputs; determinism
# ------------------------------------------------------------------------------------------
SPLAT_CASES = [
    # (M, num_maps, out_size, scale)
    (0, 4, (5, 6), 1.0),
    (1, 1, (1, 1), 1.0),
    (7, 3, (1, 9), 2.0),
    (100, 5, (7, 11), 1.0),
    (1000, 1, (16, 9), 0.25),
    (5000, 17, (40, 30), 1 / 3),
    (20000, 2, (31, 17), 0.5),
    (80000, 5, (33, 65), 0.3),  # enough points for several threads
    (150000, 3, (120, 90), 1.7),
    (100000, 1, (2, 200), 1.0),
]


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("case", SPLAT_CASES, ids=lambda c: f"M{c[0]}_maps{c[1]}_s{c[3]:.3g}")
def test_compiled_matches_reference(device, case, sort):
    if not available(device):
        pytest.skip(f"compiled op not built for {device}")
    m, num_maps, out_size, scale = case
    pts, w, mi = random_points(m, num_maps, out_size, scale, seed=m + num_maps, sort=sort)
    pts, w, mi = pts.to(device), w.to(device), mi.to(device)
    ref = splat_points_reference(pts, w, mi, num_maps, out_size, scale)
    out = raw_op(pts, w, mi, num_maps, out_size, scale)
    assert out.shape == ref.shape == (num_maps, *out_size)
    assert torch.isfinite(out).all()
    assert_within(out, ref, splat_tolerance(pts, w, mi, num_maps, out_size, scale))


@needs_op
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize(
    "num_maps, out_size",
    [(3, (20, 30)), (1, (20, 30)), (3, (600, 800))],
    ids=["small_out", "one_map", "large_out"],
)
def test_cpu_threads_are_deterministic_and_match_reference(sort, num_maps, out_size):
    # 140k points: up to 4 threads (32768 each). Sorted maps: maps split across chunks (partial
    # planes; one map: every chunk but the first is partial); unsorted with a small output:
    # whole partial outputs per thread; with a large one: a single thread.
    m, scale = 140_000, 0.5
    pts, w, mi = random_points(m, num_maps, out_size, scale, seed=9, sort=sort)
    ref = splat_points_reference(pts, w, mi, num_maps, out_size, scale)
    tol = splat_tolerance(pts, w, mi, num_maps, out_size, scale)
    for threads in (1, 2, 3, 4):
        with num_threads(threads):
            first = raw_op(pts, w, mi, num_maps, out_size, scale)
            second = raw_op(pts, w, mi, num_maps, out_size, scale)
        assert torch.equal(first, second), f"not deterministic with {threads} threads"
        assert_within(first, ref, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_single_taps_are_bit_equal(impl, device, scale):
    # One point per map: every cell gets at most one tap, so all implementations and devices
    # give the same bits (and so does the dense op, see below).
    gen = torch.Generator().manual_seed(17)
    m, out_size = 2000, (13, 17)
    pts = torch.rand(m, 2, generator=gen) * torch.tensor([15.0, 19.0]) / scale - 1.0 / scale
    w = torch.rand(m, generator=gen) * 2 - 0.5
    mi = torch.arange(m)
    out = run_impl(impl, pts.to(device), w.to(device), mi.to(device), m, out_size, scale)
    ref = splat_points_reference(pts, w, mi, m, out_size, scale)
    assert torch.count_nonzero(ref) > m
    assert torch.equal(out.cpu(), ref)


# ------------------------------------------------------------------------------------------
# the two entry points agree
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, out_size, scale",
    [
        ((2, 3, 7, 11), (7, 11), 1.0),
        ((1, 5, 33, 65), (9, 17), 0.25),
        ((1, 2, 40, 30), (14, 10), 1 / 3),
        ((1, 1, 300, 301), (300, 301), 1.0),
        ((2, 2, 31, 17), (62, 34), 2.0),
    ],
    ids=str,
)
def test_all_pixels_with_their_offsets_equal_hough_voting(impl, device, shape, out_size, scale):
    n, k, h, w = shape
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=h * w, device=device)
    if impl == "compiled" and not (available(device) and compiled_op_available(device)):
        pytest.skip(f"compiled ops not built for {device}")
    use_compiled = impl == "compiled"
    dense = hough_voting(offsets, weights, out_size, scale, use_compiled=use_compiled)
    pts, wts, maps = dense_to_points(offsets, weights)
    sparse = splat_points(pts, wts, maps, n * k, out_size, scale, use_compiled=use_compiled)
    tol = summation_tolerance(offsets, weights, out_size, scale).view(n * k, *out_size)
    assert_within(sparse, dense.view(n * k, *out_size), 2 * tol)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_pixels_only_equal_hough_voting(impl, device):
    # The post-processing use: vote only from the pixels whose weight passes a threshold.
    n, k, h, w, out_size, scale = 1, 5, 129, 257, (33, 65), 0.25
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=8, device=device)
    keep = weights > 0.9
    if impl == "compiled" and not (available(device) and compiled_op_available(device)):
        pytest.skip(f"compiled ops not built for {device}")
    use_compiled = impl == "compiled"
    dense = hough_voting(
        offsets, torch.where(keep, weights, 0.0), out_size, scale, use_compiled=use_compiled
    )
    pts, wts, maps = dense_to_points(offsets, weights, keep)
    assert 0.05 < len(wts) / weights.numel() < 0.2
    sparse = splat_points(pts, wts, maps, n * k, out_size, scale, use_compiled=use_compiled)
    tol = summation_tolerance(offsets, torch.where(keep, weights, 0.0), out_size, scale)
    assert_within(sparse, dense.view(n * k, *out_size), 2 * tol.view(n * k, *out_size))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_single_taps_equal_hough_voting_bits(impl, device, scale):
    out_size = (19, 23)
    offsets, weights = single_tap_inputs(512, 5, 6, out_size, scale, seed=21, device=device)
    if impl == "compiled" and not (available(device) and compiled_op_available(device)):
        pytest.skip(f"compiled ops not built for {device}")
    use_compiled = impl == "compiled"
    dense = hough_voting(offsets, weights, out_size, scale, use_compiled=use_compiled)
    pts, wts, maps = dense_to_points(offsets, weights, weights != 0)
    sparse = splat_points(pts, wts, maps, 512, out_size, scale, use_compiled=use_compiled)
    assert torch.equal(sparse, dense.view(512, *out_size))


# ------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile, meta tensors
# ------------------------------------------------------------------------------------------
@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not available(device):
        pytest.skip(f"compiled op not built for {device}")
    op = torch.ops.deeperlab_d2.splat_points.default
    for m, num_maps, out_size, scale in [SPLAT_CASES[3], SPLAT_CASES[5], SPLAT_CASES[7]]:
        pts, w, mi = random_points(m, num_maps, out_size, scale, seed=1, device=device)
        tolerances = {}
        if device == "cuda":
            # opcheck runs the op more than once: CUDA atomics sum in another order each time.
            tol = splat_tolerance(pts, w, mi, num_maps, out_size, scale)
            tolerances = {"rtol": 1.3e-6, "atol": max(2 * tol.max().item(), 1e-30)}
        torch.library.opcheck(op, (pts, w, mi, num_maps, *out_size, scale), **tolerances)


def test_meta_tensors_give_shapes():
    pts = torch.empty(10, 2, device="meta")
    w = torch.empty(10, device="meta")
    mi = torch.empty(10, dtype=torch.int64, device="meta")
    for use_compiled in (None, False):
        out = splat_points(pts, w, mi, 3, (5, 6), 0.5, use_compiled=use_compiled)
        assert out.device.type == "meta" and out.shape == (3, 5, 6)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
# the compiled op through torch.compile (register_fake); compiling the pure-PyTorch reference
# (plain index_add_) tests Inductor more than this package and takes ~35 s on 2 cores
@pytest.mark.parametrize("use_compiled", [True], ids=["op"])
def test_torch_compile_fullgraph(device, use_compiled):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if use_compiled and not available(device):
        pytest.skip(f"compiled op not built for {device}: {NOT_BUILT}")
    torch._dynamo.reset()

    def fn(points, weights, map_index):
        keep = weights > 0.2  # data-dependent selection stays outside: shapes are static here
        w = torch.where(keep, weights, 0.0)
        short = splat_points(points, w, map_index, 4, (17, 33), 0.5, use_compiled=use_compiled)
        return short * 3.0 + splat_points(
            points, w * 2, map_index, 4, (17, 33), 0.5, use_compiled=use_compiled
        )

    def check(m, seed):
        pts, w, mi = random_points(m, 4, (17, 33), 0.5, seed=seed, device=device)
        expected = fn(pts, w, mi)
        out = compiled(pts, w, mi)
        tol = 2 * 5 * splat_tolerance(pts, torch.where(w > 0.2, w, 0.0), mi, 4, (17, 33), 0.5)
        assert_within(out, expected, tol)

    compiled = torch.compile(fn, fullgraph=True)
    check(500, seed=11)
    check(500, seed=12)  # same shapes, other values
    check(700, seed=13)  # another number of points


# ------------------------------------------------------------------------------------------
# dispatch between the compiled op and the reference
# ------------------------------------------------------------------------------------------
class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_picks_compiled_op_on_cpu_when_built():
    pts, w, mi = random_points(50, 2, (8, 9), 1.0, seed=0)
    with RecordOps() as rec:
        splat_points(pts, w, mi, 2, (8, 9))
    uses_op = any(op.startswith("deeperlab_d2.splat_points") for op in rec.ops)
    assert uses_op == HAS_SPLAT_OP
    if HAS_SPLAT_OP:
        assert not any("index_add" in op for op in rec.ops)


def test_dispatch_use_compiled_false_uses_reference():
    pts, w, mi = random_points(50, 2, (8, 9), 1.0, seed=0)
    with RecordOps() as rec:
        out = splat_points(pts, w, mi, 2, (8, 9), use_compiled=False)
    assert not any(op.startswith("deeperlab_d2.") for op in rec.ops)
    assert any("index_add" in op for op in rec.ops)
    torch.testing.assert_close(out, splat_points_reference(pts, w, mi, 2, (8, 9)))


def test_cuda_kernel_availability_is_consistent():
    assert available("cuda") == (HAS_SPLAT_OP and compiled_op_available("cuda"))
    with pytest.raises(ValueError, match="op must be one of"):
        compiled_op_available("cpu", op="nope")


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(hv_module, "_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(hv_module, "_SPLAT_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(hv_module, "_WARNED_FALLBACKS", set())


def test_use_compiled_true_without_kernel_raises(no_kernels):
    pts, w, mi = random_points(20, 1, (4, 4), 1.0, seed=0)
    with pytest.raises(RuntimeError, match="use_compiled=True.*not available for device cpu"):
        splat_points(pts, w, mi, 1, (4, 4), use_compiled=True)


def test_fallback_warns_once_per_op_and_device_type(no_kernels):
    pts, w, mi = random_points(20, 2, (4, 4), 1.0, seed=0)
    with pytest.warns(ReferenceFallbackWarning) as record:
        out = splat_points(pts, w, mi, 2, (4, 4))
        splat_points(pts, w, mi, 2, (5, 5))
    assert len(record) == 1
    assert "splat_points on cpu tensors runs the pure-PyTorch reference" in str(record[0].message)
    assert record[0].filename == __file__
    torch.testing.assert_close(out, splat_points_reference(pts, w, mi, 2, (4, 4)))
    # hough_voting has its own warning (a stale build may have one op and not the other)
    offsets, weights = random_inputs(1, 1, 4, 4, (4, 4), seed=0)
    with pytest.warns(ReferenceFallbackWarning, match="hough_voting on cpu"):
        hough_voting(offsets, weights, (4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splat_points(pts, w, mi, 2, (4, 4))
        hough_voting(offsets, weights, (4, 4))


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
def good_inputs(device="cpu"):
    return (
        torch.zeros(6, 2, device=device),
        torch.zeros(6, device=device),
        torch.zeros(6, dtype=torch.int64, device=device),
    )


BAD_WRAPPER_ARGS = [
    # (id, points, weights, map_index, num_maps, out_size, scale, error, message)
    ("points_1d", torch.zeros(6), None, None, 2, (4, 5), 1.0, ValueError, "points"),
    ("points_3col", torch.zeros(6, 3), None, None, 2, (4, 5), 1.0, ValueError, "points"),
    ("weights_len", None, torch.zeros(5), None, 2, (4, 5), 1.0, ValueError, "weights"),
    ("weights_2d", None, torch.zeros(6, 1), None, 2, (4, 5), 1.0, ValueError, "weights"),
    (
        "map_index_len",
        None,
        None,
        torch.zeros(7, dtype=torch.int64),
        2,
        (4, 5),
        1.0,
        ValueError,
        "map_index",
    ),
    ("points_f64", torch.zeros(6, 2).double(), None, None, 2, (4, 5), 1.0, TypeError, "points"),
    ("weights_f16", None, torch.zeros(6).half(), None, 2, (4, 5), 1.0, TypeError, "weights"),
    (
        "map_index_int32",
        None,
        None,
        torch.zeros(6, dtype=torch.int32),
        2,
        (4, 5),
        1.0,
        TypeError,
        "map_index",
    ),
    ("points_numpy", np.zeros((6, 2), np.float32), None, None, 2, (4, 5), 1.0, TypeError, "points"),
    ("num_maps_float", None, None, None, 2.0, (4, 5), 1.0, TypeError, "num_maps"),
    ("num_maps_neg", None, None, None, -1, (4, 5), 1.0, ValueError, "num_maps"),
    ("out_size_len", None, None, None, 2, (4,), 1.0, TypeError, "out_size"),
    ("out_size_neg", None, None, None, 2, (4, -1), 1.0, ValueError, "out_size"),
    ("scale_zero", None, None, None, 2, (4, 5), 0.0, ValueError, "scale"),
    ("scale_nan", None, None, None, 2, (4, 5), math.nan, ValueError, "scale"),
    ("scale_str", None, None, None, 2, (4, 5), "1", TypeError, "scale"),
]


@pytest.mark.parametrize("use_compiled", [None, False])
@pytest.mark.parametrize(
    "points, weights, map_index, num_maps, out_size, scale, error, message",
    [case[1:] for case in BAD_WRAPPER_ARGS],
    ids=[case[0] for case in BAD_WRAPPER_ARGS],
)
def test_wrapper_rejects_bad_inputs(
    points, weights, map_index, num_maps, out_size, scale, error, message, use_compiled
):
    good = good_inputs()
    args = [good[i] if t is None else t for i, t in enumerate((points, weights, map_index))]
    with pytest.raises(error, match=message):
        splat_points(*args, num_maps, out_size, scale, use_compiled=use_compiled)
    with pytest.raises(error, match=message):
        splat_points_reference(*args, num_maps, out_size, scale)


def test_wrapper_rejects_device_mismatch():
    pts, w, mi = good_inputs()
    with pytest.raises(ValueError, match="same device.*points on meta"):
        splat_points(pts.to("meta"), w, mi, 2, (4, 5))
    with pytest.raises(ValueError, match="same device"):
        splat_points_reference(pts, w, mi.to("meta"), 2, (4, 5))


@pytest.mark.parametrize("impl", ["reference", "compiled"])
@pytest.mark.parametrize("m", [6, 200_000], ids=["few", "threaded"])
@pytest.mark.parametrize("bad_value", [-1, 2, 2**40])
def test_map_index_out_of_range_raises_index_error(impl, m, bad_value):
    pts = torch.rand(m, 2) * 4
    w = torch.zeros(m)  # checked even for points that cast nothing
    mi = torch.zeros(m, dtype=torch.int64)
    mi[m - 3] = bad_value
    mi[m - 1] = bad_value
    with num_threads(4):  # the kernel checks chunks in parallel: still the first bad index
        with pytest.raises(IndexError, match=rf"map_index\[{m - 3}\] = {bad_value} is out of"):
            run_impl(impl, pts, w, mi, 2, (4, 5))
    # also with an empty output
    with pytest.raises(IndexError, match="out of range"):
        run_impl(impl, pts, w, mi, 2, (0, 5))
    with pytest.raises(IndexError, match="out of range"):
        run_impl(impl, pts[:1], w[:1], mi[:1], 0, (4, 5))  # no map at all


BAD_OP_ARGS = [
    ("points_1d", torch.zeros(6), None, None, 2, 4, 5, 1.0, "points must be a 2-D tensor"),
    ("weights_len", None, torch.zeros(5), None, 2, 4, 5, 1.0, "weights must be a 1-D tensor"),
    (
        "map_index_len",
        None,
        None,
        torch.zeros(5, dtype=torch.int64),
        2,
        4,
        5,
        1.0,
        "map_index must be a 1-D tensor",
    ),
    ("points_f64", torch.zeros(6, 2).double(), None, None, 2, 4, 5, 1.0, "points must be float32"),
    ("weights_f16", None, torch.zeros(6).half(), None, 2, 4, 5, 1.0, "weights must be float32"),
    (
        "map_index_int32",
        None,
        None,
        torch.zeros(6, dtype=torch.int32),
        2,
        4,
        5,
        1.0,
        "map_index must be int64",
    ),
    ("num_maps_neg", None, None, None, -1, 4, 5, 1.0, "num_maps must be >= 0"),
    ("out_h_neg", None, None, None, 2, -1, 5, 1.0, "out_h and out_w must be >= 0"),
    ("scale_zero", None, None, None, 2, 4, 5, 0.0, "scale must be finite and > 0"),
    ("scale_inf", None, None, None, 2, 4, 5, math.inf, "scale must be finite and > 0"),
]


@needs_op
@pytest.mark.parametrize("device", ["cpu", "meta", CUDA])  # meta: the fake implementation
@pytest.mark.parametrize(
    "points, weights, map_index, num_maps, out_h, out_w, scale, message",
    [case[1:] for case in BAD_OP_ARGS],
    ids=[case[0] for case in BAD_OP_ARGS],
)
def test_raw_op_rejects_bad_inputs(
    device, points, weights, map_index, num_maps, out_h, out_w, scale, message
):
    if not available(device):
        pytest.skip(f"compiled op not built for {device}")
    good = good_inputs(device)
    args = [
        good[i] if t is None else t.to(device) for i, t in enumerate((points, weights, map_index))
    ]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deeperlab_d2.splat_points(*args, num_maps, out_h, out_w, scale)


@needs_op
@pytest.mark.parametrize("other", ["meta", CUDA])
def test_raw_op_rejects_device_mismatch(other):
    if not available(other):
        pytest.skip(f"compiled op not built for {other}")
    for i in range(3):
        args = list(good_inputs())
        args[i] = args[i].to(other)
        with pytest.raises(RuntimeError, match="must be on the same device"):
            torch.ops.deeperlab_d2.splat_points(*args, 2, 4, 5, 1.0)


# ------------------------------------------------------------------------------------------
# CUDA on real hardware
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not available("cuda"):
        pytest.skip(f"compiled op not built for cuda: {NOT_BUILT} with nvcc")
    if not available("cpu"):
        pytest.skip("compiled op not built for cpu")


@pytest.mark.slow
@pytest.mark.parametrize("index_path", ["auto", "int64"])
def test_cuda_kernel_matches_cpu_kernel_production_size(cuda_kernel, index_path):
    # Every pixel of a 1 x 17 x 1100 x 1100 field as a point: 20.6M points (grid-stride loop);
    # "int64" forces the 64-bit index path.
    n, k, h, w, out_size = 1, 17, 1100, 1100, (1100, 1100)
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=5)
    pts, wts, maps = dense_to_points(offsets, weights)
    cpu = raw_op(pts, wts, maps, n * k, out_size)
    args = (pts.cuda(), wts.cuda(), maps.cuda())
    context = force_int64_indexing() if index_path == "int64" else contextlib.nullcontext()
    with context:
        out = raw_op(*args, n * k, out_size)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    tol = splat_tolerance(*args, n * k, out_size)
    assert_within(out, cpu.cuda(), 2 * tol)
    # and the dense op on the same field
    dense = torch.ops.deeperlab_d2.hough_voting(offsets.cuda(), weights.cuda(), *out_size, 1.0)
    assert_within(out, dense.view(n * k, *out_size), 2 * tol)


@pytest.mark.slow
def test_cuda_kernel_64bit_indices_on_an_output_over_2g_cells(cuda_kernel):
    require_free_gpu_memory(10)
    num_maps, side = 3, 26755  # 3 * 26755^2 > 2^31
    last = side - 1
    votes = [
        (2, last - 0.5, last - 0.75, 1.0),
        (2, last, last, 2.0),
        (2, last + 0.5, last + 0.5, 4.0),  # row and column out of the grid but one tap in
        (0, 1.25, 0.0, 8.0),
    ]
    pts, w, mi = make_points(votes, "cuda")
    out = raw_op(pts, w, mi, num_maps, (side, side))
    corner = torch.zeros(3, 3)
    corner[1, 1] = 0.5 * 0.75
    corner[1, 2] = 0.5 * 0.25
    corner[2, 1] = 0.5 * 0.75
    corner[2, 2] = 0.5 * 0.25 + 2.0 + 0.25 * 4.0
    torch.testing.assert_close(out[2, -3:, -3:].cpu(), corner, rtol=0, atol=0)
    assert out[0, 1, 0].item() == 6.0 and out[0, 2, 0].item() == 2.0
    assert out.sum().item() == 1.0 + 2.0 + 1.0 + 8.0
    assert torch.count_nonzero(out).item() == 6


@pytest.mark.parametrize("scale", [1 / 3, 0.3, 0.37, 1.7])
@pytest.mark.parametrize("case", SPLAT_CASES[3:], ids=lambda c: f"M{c[0]}_maps{c[1]}")
def test_cuda_kernel_matches_cpu_kernel_any_scale(cuda_kernel, case, scale):
    m, num_maps, out_size, _ = case
    pts, w, mi = random_points(m, num_maps, out_size, scale, seed=m)
    cpu = raw_op(pts, w, mi, num_maps, out_size, scale)
    tol = splat_tolerance(pts, w, mi, num_maps, out_size, scale)
    for index_path in ("auto", "int64"):
        context = force_int64_indexing() if index_path == "int64" else contextlib.nullcontext()
        with context:
            out = raw_op(pts.cuda(), w.cuda(), mi.cuda(), num_maps, out_size, scale)
        assert_within(out.cpu(), cpu, 2 * tol)


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_cuda_kernel_single_taps_equal_cpu_kernel_bits(cuda_kernel, scale):
    gen = torch.Generator().manual_seed(23)
    m, out_size = 8192, (29, 31)
    pts = torch.rand(m, 2, generator=gen) * torch.tensor([31.0, 33.0]) / scale - 1.0 / scale
    w = torch.rand(m, generator=gen) * 2 - 0.5
    mi = torch.arange(m)
    cpu = raw_op(pts, w, mi, m, out_size, scale)
    out = raw_op(pts.cuda(), w.cuda(), mi.cuda(), m, out_size, scale)
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.slow
def test_cuda_map_index_out_of_range_is_a_device_assertion(cuda_kernel):
    # A device-side assertion leaves the CUDA context unusable: run it in a subprocess.
    code = textwrap.dedent(
        """
        import torch
        import deeperlab_d2.layers  # registers the op
        pts = torch.zeros(4, 2, device="cuda")
        w = torch.ones(4, device="cuda")
        mi = torch.tensor([0, 1, 5, 0], device="cuda")
        try:
            torch.ops.deeperlab_d2.splat_points(pts, w, mi, 2, 4, 4, 1.0)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
        else:
            print("NO ERROR")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert "RAISED" in result.stdout, result.stdout + result.stderr


@needs_op
def test_compiled_op_rejects_output_sizes_past_int32():
    """The size limit of both kernels (32-bit tap coordinates) is an argument check, raised
    before any allocation."""
    points = torch.zeros(1, 2)
    weights = torch.ones(1)
    index = torch.zeros(1, dtype=torch.long)
    op = torch.ops.deeperlab_d2.splat_points
    for out_h, out_w in ((2**31, 1), (1, 2**31)):
        with pytest.raises(RuntimeError, match=r"out_h and out_w must be < 2\^31"):
            op(points, weights, index, 1, out_h, out_w, 1.0)
