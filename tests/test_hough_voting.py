"""Keypoint Hough voting: exact values, compiled op vs. PyTorch reference, op registration.

Needs only torch (no Detectron2). Tests of the compiled op skip when ``deeperlab_d2._C`` is not
built; the CUDA variants skip when no GPU is visible (checked at test time, never at import).
"""

import contextlib
import importlib
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deeperlab_d2.layers import (
    HAS_COMPILED_OP,
    ReferenceFallbackWarning,
    compiled_op_available,
    compiled_with_cuda,
    hough_voting,
    hough_voting_reference,
)

# The module, not the function of the same name that deeperlab_d2.layers exports.
hv_module = importlib.import_module("deeperlab_d2.layers.hough_voting")

NOT_BUILT = "deeperlab_d2._C is not built (pip install --no-build-isolation -e .)"
needs_op = pytest.mark.skipif(not HAS_COMPILED_OP, reason=NOT_BUILT)

# The string condition is evaluated when the test runs, so collection never touches CUDA.
CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif("not torch.cuda.is_available()", reason="CUDA is not available"),
)
DEVICES = ["cpu", CUDA]
IMPLS = ["reference", "compiled"]


def run_impl(impl, offsets, weights, out_size, scale=1.0):
    """Runs one implementation, skipping the compiled one where it has no kernel."""
    if impl == "reference":
        return hough_voting_reference(offsets, weights, out_size, scale)
    if not compiled_op_available(offsets.device):
        pytest.skip(f"compiled op not built for {offsets.device.type}: {NOT_BUILT}")
    return hough_voting(offsets, weights, out_size, scale, use_compiled=True)


def make_votes(shape, votes, device="cpu"):
    """Inputs with only the listed votes non-zero.

    Args:
        shape: (N, K, H, W) of the source grid.
        votes: iterable of (n, k, y, x, dy, dx, weight).
        device: where to put the tensors.

    Returns:
        (offsets [N, K, 2, H, W], weights [N, K, H, W]).
    """
    n, k, h, w = shape
    offsets = torch.zeros(n, k, 2, h, w)
    weights = torch.zeros(n, k, h, w)
    for i, j, y, x, dy, dx, wt in votes:
        offsets[i, j, 0, y, x] = dy
        offsets[i, j, 1, y, x] = dx
        weights[i, j, y, x] = wt
    return offsets.to(device), weights.to(device)


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def summation_tolerance(offsets, weights, out_size, scale=1.0):
    """Per-cell bound on the float32 summation-order error of the vote maps.

    Cell c is the sum of its n_c taps in some order; two orders differ by about
    eps * sum|tap| * sqrt(n_c) / 4 (random rounding). The bound is 8 eps * sum|tap| *
    sqrt(n_c + 1), so a cell that receives nothing must be exactly 0 in both.
    """
    valid = torch.isfinite(weights) & (weights != 0)
    mass = hough_voting_reference(offsets, torch.where(valid, weights.abs(), 0.0), out_size, scale)
    count = hough_voting_reference(offsets, valid.float(), out_size, scale)
    return 8 * torch.finfo(torch.float32).eps * mass * (count + 1).sqrt()


def atomic_tolerances(tol):
    """(rtol, atol) for torch.testing.assert_close / opcheck that cover two runs of a kernel
    summing with float32 atomics (any order): atol = the largest per-cell bound of
    :func:`summation_tolerance` (twice, as both runs may err), rtol = float32's default (opcheck
    only honours the pair when both are non-zero)."""
    return 1.3e-6, max(2 * tol.max().item(), 1e-30)


def assert_close_to_within(out, ref, tol):
    """``|out - ref| <= tol`` cell by cell."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    excess = (out - ref).abs() - tol
    worst = int(excess.argmax())
    assert excess.max().item() <= 0, (
        f"{int((excess > 0).sum())} cells differ beyond the summation-order bound; worst at flat "
        f"index {worst}: out={out.flatten()[worst].item()}, ref={ref.flatten()[worst].item()}, "
        f"tol={tol.flatten()[worst].item()}"
    )


def assert_votes_close(out, ref, offsets, weights, out_size, scale=1.0):
    """``out == ref`` up to float32 summation-order error (see :func:`summation_tolerance`)."""
    assert_close_to_within(out, ref, summation_tolerance(offsets, weights, out_size, scale))


# ------------------------------------------------------------------------------------------
# exact values on hand-built votes (both implementations, every device)
# ------------------------------------------------------------------------------------------
@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.mark.parametrize("device", DEVICES)
class TestExactValues:
    def test_integer_position_lands_in_one_cell(self, impl, device):
        off, w = make_votes((1, 1, 5, 6), [(0, 0, 2, 3, 1.0, -2.0, 0.7)], device)
        out = run_impl(impl, off, w, (6, 6))
        expected = torch.zeros(1, 1, 6, 6)
        expected[0, 0, 3, 1] = 0.7
        assert out.shape == (1, 1, 6, 6) and out.dtype == torch.float32
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)

    def test_fractional_position_splits_bilinearly(self, impl, device):
        # (0, 0) + (1.5, 2.25): fy = 0.5, fx = 0.25, weight 2.
        off, w = make_votes((1, 1, 4, 4), [(0, 0, 0, 0, 1.5, 2.25, 2.0)], device)
        out = run_impl(impl, off, w, (4, 5)).cpu()[0, 0]
        expected = torch.zeros(4, 5)
        expected[1, 2] = 0.5 * 0.75 * 2
        expected[1, 3] = 0.5 * 0.25 * 2
        expected[2, 2] = 0.5 * 0.75 * 2
        expected[2, 3] = 0.5 * 0.25 * 2
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert out.sum().item() == 2.0

    def test_votes_accumulate(self, impl, device):
        votes = [
            (0, 0, 0, 0, 2.0, 2.0, 0.25),  # -> (2, 2)
            (0, 0, 3, 1, -1.0, 1.0, 0.5),  # -> (2, 2)
            (0, 0, 1, 1, 0.0, 0.5, 1.0),  # -> (1, 1.5)
            (0, 0, 2, 0, -1.0, 2.5, 1.0),  # -> (1, 2.5)
        ]
        off, w = make_votes((1, 1, 4, 4), votes, device)
        out = run_impl(impl, off, w, (4, 4)).cpu()[0, 0]
        expected = torch.zeros(4, 4)
        expected[2, 2] = 0.75
        expected[1, 1] = 0.5
        expected[1, 2] = 1.0
        expected[1, 3] = 0.5
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_scale(self, impl, device):
        # ((4 + 2) * 0.5, (6 + 1) * 0.5) = (3, 3.5)
        off, w = make_votes((1, 1, 8, 8), [(0, 0, 4, 6, 2.0, 1.0, 1.0)], device)
        out = run_impl(impl, off, w, (5, 5), scale=0.5).cpu()[0, 0]
        expected = torch.zeros(5, 5)
        expected[3, 3] = 0.5
        expected[3, 4] = 0.5
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # scale 2: (1 + 0.25) * 2 = 2.5 rows, (0 + 1) * 2 = 2 columns
        off, w = make_votes((1, 1, 3, 3), [(0, 0, 1, 0, 0.25, 1.0, 1.0)], device)
        out = run_impl(impl, off, w, (6, 6), scale=2.0).cpu()[0, 0]
        expected = torch.zeros(6, 6)
        expected[2, 2] = 0.5
        expected[3, 2] = 0.5
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_vote_partly_outside_keeps_in_grid_taps(self, impl, device):
        votes = [
            (0, 0, 0, 1, -0.5, 0.0, 1.0),  # (-0.5, 1): only row 0 keeps 0.5
            (0, 0, 3, 3, 0.5, 1.75, 1.0),  # (3.5, 4.75) in a 4x5 grid: only (3, 4) keeps .5*.25
            (0, 0, 2, 0, 0.0, -0.25, 1.0),  # (2, -0.25): only column 0 keeps 0.75
        ]
        off, w = make_votes((1, 1, 4, 4), votes, device)
        out = run_impl(impl, off, w, (4, 5)).cpu()[0, 0]
        expected = torch.zeros(4, 5)
        expected[0, 1] = 0.5
        expected[3, 4] = 0.125
        expected[2, 0] = 0.75
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_vote_completely_outside_casts_nothing(self, impl, device):
        votes = [
            (0, 0, 0, 0, -1.0, 2.0, 1.0),  # (-1, 2): its only in-grid tap has weight 0
            (0, 0, 0, 1, -5.0, 0.0, 1.0),
            (0, 0, 1, 0, 0.0, 5.0, 1.0),  # column 5 = out_w
            (0, 0, 1, 1, 3.0, 0.0, 1.0),  # row 4 = out_h
            (0, 0, 2, 2, 1e4, -1e4, 1.0),
            (0, 0, 3, 3, -4.5, -4.5, 1.0),
            (0, 0, 2, 1, 3e38, 3e38, 1.0),  # huge but finite
        ]
        off, w = make_votes((1, 1, 4, 4), votes, device)
        out = run_impl(impl, off, w, (4, 5))
        assert torch.count_nonzero(out).item() == 0

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite_votes_cast_nothing(self, impl, device, bad):
        votes = [
            (0, 0, 0, 0, bad, 1.0, 1.0),
            (0, 0, 0, 1, 1.0, bad, 1.0),
            (0, 0, 0, 2, bad, bad, 1.0),
            (0, 0, 1, 0, 1.0, 1.0, bad),
            (0, 0, 1, 1, 1.0, 0.0, 0.0),  # zero weight
            (0, 0, 2, 2, 0.5, 0.5, 1.0),  # the one valid vote
        ]
        off, w = make_votes((1, 1, 4, 4), votes, device)
        out = run_impl(impl, off, w, (4, 4)).cpu()[0, 0]
        expected = torch.zeros(4, 4)
        expected[2:4, 2:4] = 0.25
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    @pytest.mark.parametrize(
        "shape, out_size",
        [
            ((0, 3, 4, 4), (4, 4)),
            ((2, 0, 4, 4), (4, 4)),
            ((1, 2, 0, 4), (3, 3)),
            ((1, 2, 4, 0), (3, 3)),
            ((1, 2, 4, 4), (0, 4)),
            ((1, 2, 4, 4), (4, 0)),
        ],
    )
    def test_zero_size(self, impl, device, shape, out_size):
        n, k, h, w = shape
        off = torch.ones(n, k, 2, h, w, device=device)
        wt = torch.ones(n, k, h, w, device=device)
        out = run_impl(impl, off, wt, out_size)
        assert out.shape == (n, k, *out_size)
        assert torch.count_nonzero(out).item() == 0

    def test_channels_and_images_do_not_mix(self, impl, device):
        votes = []
        expected = torch.zeros(2, 3, 5, 5)
        for i in range(2):
            for j in range(3):
                y, x = i + 1, j + 1  # a different target cell per plane
                wt = 1.0 + i * 3 + j
                votes.append((i, j, 2, 2, y - 2.0, x - 2.0, wt))
                expected[i, j, y, x] = wt
        off, w = make_votes((2, 3, 5, 5), votes, device)
        out = run_impl(impl, off, w, (5, 5)).cpu()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_non_contiguous_inputs(self, impl, device):
        gen = torch.Generator().manual_seed(3)
        off = torch.randn(2, 7, 6, 2, 3, generator=gen) * 3  # [N, W, H, 2, K]
        w = torch.rand(2, 7, 6, 3, generator=gen)  # [N, W, H, K]
        off_nc = off.permute(0, 4, 3, 2, 1).to(device)
        w_nc = w.permute(0, 3, 2, 1).to(device)
        assert not off_nc.is_contiguous() and not w_nc.is_contiguous()
        out = run_impl(impl, off_nc, w_nc, (6, 7))
        ref = hough_voting_reference(off_nc.contiguous(), w_nc.contiguous(), (6, 7))
        assert_votes_close(out, ref, off_nc, w_nc, (6, 7))


# ------------------------------------------------------------------------------------------
# compiled op vs. reference on random inputs
# ------------------------------------------------------------------------------------------
def random_inputs(n, k, h, w, out_size, seed, device="cpu"):
    """A field of votes converging on one centre per plane (plus noise), sprinkled with far-away
    offsets, NaN/inf offsets and weights, zero and negative weights."""
    gen = torch.Generator().manual_seed(seed)
    oh, ow = out_size
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    centres = torch.rand(n, k, 2, 1, 1, generator=gen) * torch.tensor([h, w]).view(1, 1, 2, 1, 1)
    offsets = centres - torch.stack([ys, xs])  # [n, k, 2, h, w]
    offsets = offsets + torch.randn(n, k, 2, h, w, generator=gen) * 2.0
    weights = torch.rand(n, k, h, w, generator=gen)

    def sprinkle(t, values, frac):
        mask = torch.rand(t.shape, generator=gen) < frac
        choice = torch.randint(len(values), t.shape, generator=gen)
        return torch.where(mask, torch.tensor(values)[choice], t)

    offsets = sprinkle(offsets, [math.nan, math.inf, -math.inf, 1e4, -1e4, 1e30], 0.02)
    weights = sprinkle(weights, [math.nan, math.inf, -math.inf, 0.0, -0.5], 0.03)
    return offsets.to(device), weights.to(device)


CASES = [
    # (N, K, H, W, out_size, scale)
    (1, 1, 1, 1, (1, 1), 1.0),
    (1, 1, 1, 1, (3, 2), 2.0),
    (2, 3, 7, 11, (7, 11), 1.0),
    (1, 5, 16, 9, (5, 7), 0.25),
    (1, 2, 33, 65, (9, 17), 0.25),
    (3, 1, 10, 10, (20, 20), 2.0),
    (2, 2, 31, 17, (16, 9), 0.5),
    (1, 17, 40, 30, (40, 30), 1.0),
    (1, 1, 300, 301, (300, 301), 1.0),  # enough votes to split rows across threads
    (1, 5, 129, 257, (33, 65), 0.25),
    (2, 3, 120, 90, (61, 46), 0.5),
]


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"_s{c[5]}")
def test_compiled_matches_reference(device, case):
    n, k, h, w, out_size, scale = case
    if not compiled_op_available(device):
        pytest.skip(f"compiled op not built for {device}")
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=h * 1000 + w, device=device)
    ref = hough_voting_reference(offsets, weights, out_size, scale)
    out = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, scale)
    assert out.shape == ref.shape == (n, k, *out_size)
    assert torch.isfinite(out).all()
    assert_votes_close(out, ref, offsets, weights, out_size, scale)


@needs_op
@pytest.mark.parametrize("nk", [(1, 1), (1, 3), (1, 5), (2, 4)])
def test_cpu_thread_splits_match_reference_and_are_deterministic(nk):
    # ~140k votes in all: enough for up to 4 threads (32768 votes each), so that planes are split
    # across threads (partial buffers) for every thread count that does not divide N*K.
    n, k = nk
    h = 129
    w = -(-140_000 // (n * k * h))
    out_size = (65, (w + 1) // 2)
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=7)
    ref = hough_voting_reference(offsets, weights, out_size, 0.5)
    for threads in (1, 2, 3, 4):
        with num_threads(threads):
            first = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, 0.5)
            second = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, 0.5)
        assert torch.equal(first, second), f"not deterministic with {threads} threads"
        assert_votes_close(first, ref, offsets, weights, out_size, 0.5)


# ------------------------------------------------------------------------------------------
# bit-equal taps (no fused multiply-add anywhere), non-power-of-two scales
# ------------------------------------------------------------------------------------------
SCALES = [1 / 3, 0.3, 0.37, 1.7, 0.25]


def single_tap_inputs(planes, h, w, out_size, scale, seed, device="cpu"):
    """[planes, 1, h, w] inputs with one voting pixel per plane, at a position spread over (and
    a little beyond) the output grid: every output cell gets at most one tap, so every
    implementation must give the same bits (no summation order to differ in)."""
    gen = torch.Generator().manual_seed(seed)
    oh, ow = out_size
    # target positions in output cells, including the border band (-1, 0) and (size - 1, size)
    target = torch.rand(planes, 2, 1, 1, generator=gen) * torch.tensor([oh + 1.0, ow + 1.0]).view(
        1, 2, 1, 1
    ) - torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    offsets = target / scale - torch.stack([ys, xs])  # [planes, 2, h, w]
    offsets = offsets + torch.randn(planes, 2, h, w, generator=gen) * 0.3
    pick = torch.randint(h * w, (planes,), generator=gen)
    weights = torch.zeros(planes, h * w)
    value = (torch.rand(planes, generator=gen) * 1.9 + 0.1) * torch.where(
        torch.rand(planes, generator=gen) < 0.2, -1.0, 1.0
    )
    weights[torch.arange(planes), pick] = value
    return (
        offsets.view(planes, 1, 2, h, w).to(device),
        weights.view(planes, 1, h, w).to(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_single_taps_are_bit_equal(impl, device, scale):
    out_size = (19, 23)
    offsets, weights = single_tap_inputs(512, 5, 6, out_size, scale, seed=21, device=device)
    out = run_impl(impl, offsets, weights, out_size, scale)
    ref_cpu = hough_voting_reference(offsets.cpu(), weights.cpu(), out_size, scale)
    assert torch.count_nonzero(ref_cpu) > 512  # most votes cast several taps
    assert torch.equal(out.cpu(), ref_cpu)


# ------------------------------------------------------------------------------------------
# CUDA on real hardware: sizes, index paths and scales the CPU tests cannot reach
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_kernel():
    """Skips unless a GPU is visible and the extension has the CUDA kernel."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not compiled_op_available("cuda"):
        pytest.skip(f"compiled op not built for cuda: {NOT_BUILT} with nvcc")


@contextlib.contextmanager
def force_int64_indexing():
    """Makes the CUDA kernels take their 64-bit index path (a test hook of deeperlab_d2._C)."""
    ext = importlib.import_module("deeperlab_d2._C")
    old = ext._set_force_int64_indexing(True)
    try:
        yield
    finally:
        ext._set_force_int64_indexing(old)


def require_free_gpu_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@needs_op
def test_force_int64_indexing_hook_round_trips():
    # Runs without a GPU: the hook exists in every build and only steers the CUDA kernels.
    ext = importlib.import_module("deeperlab_d2._C")
    with force_int64_indexing():
        assert ext._set_force_int64_indexing(True) is True
    assert ext._set_force_int64_indexing(False) is False


@pytest.mark.slow
@pytest.mark.parametrize("index_path", ["auto", "int64"])
def test_cuda_kernel_matches_cpu_kernel_production_size(cuda_kernel, index_path):
    # 1 x 17 x 1100 x 1100 (COCO keypoints at full resolution): 20.6M votes, more threads than
    # the 65536 x 256 of one launch (grid-stride loop); "int64" forces the 64-bit index path.
    if not compiled_op_available("cpu"):
        pytest.skip("compiled op not built for cpu")
    n, k, h, w, out_size, scale = 1, 17, 1100, 1100, (1100, 1100), 1.0
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=5)
    cpu = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, scale)
    off_d, w_d = offsets.cuda(), weights.cuda()
    context = force_int64_indexing() if index_path == "int64" else contextlib.nullcontext()
    with context:
        out = torch.ops.deeperlab_d2.hough_voting(off_d, w_d, *out_size, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    tol = summation_tolerance(off_d, w_d, out_size, scale)  # on the GPU: fast
    assert_close_to_within(out, cpu.cuda(), 2 * tol)


@pytest.mark.slow
def test_cuda_kernel_64bit_indices_on_an_output_over_2g_cells(cuda_kernel):
    # 46341^2 > 2^31 cells: offsets into the output no longer fit in 32 bits (8.6 GB).
    require_free_gpu_memory(10)
    side = 46341
    last = side - 1
    votes = [
        (0, 0, 0, 0, last - 0.5, last - 0.75, 1.0),  # (last - .5, last - .75): 4 taps
        (0, 0, 0, 1, last + 0.0, last - 1.0, 2.0),  # (last, last): one cell
        (0, 0, 1, 1, last - 0.5, last + 0.5, 4.0),  # (last - .5, last + 1.5): outside
        (0, 0, 1, 0, 0.25, 0.0, 8.0),  # (1.25, 0): 2 taps at the start
    ]
    offsets, weights = make_votes((1, 1, 2, 2), votes, "cuda")
    out = torch.ops.deeperlab_d2.hough_voting(offsets, weights, side, side, 1.0)
    assert out.shape == (1, 1, side, side)
    corner = torch.zeros(3, 3)  # rows and columns last - 2, last - 1, last
    corner[1, 1] = 0.5 * 0.75
    corner[1, 2] = 0.5 * 0.25
    corner[2, 1] = 0.5 * 0.75
    corner[2, 2] = 0.5 * 0.25 + 2.0
    torch.testing.assert_close(out[0, 0, -3:, -3:].cpu(), corner, rtol=0, atol=0)
    torch.testing.assert_close(
        out[0, 0, :3, :2].cpu(), torch.tensor([[0.0, 0.0], [6.0, 0.0], [2.0, 0.0]]), rtol=0, atol=0
    )
    assert out.sum().item() == 1.0 + 2.0 + 8.0
    assert torch.count_nonzero(out).item() == 6


@pytest.mark.parametrize("scale", [1 / 3, 0.3, 0.37, 1.7])
@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[9], CASES[10]], ids=str)
def test_cuda_kernel_matches_cpu_kernel_any_scale(cuda_kernel, case, scale):
    if not compiled_op_available("cpu"):
        pytest.skip("compiled op not built for cpu")
    n, k, h, w, _, _ = case
    out_size = (max(1, round(h * scale)), max(1, round(w * scale)))
    offsets, weights = random_inputs(n, k, h, w, out_size, seed=h + w)
    cpu = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, scale)
    for index_path in ("auto", "int64"):
        context = force_int64_indexing() if index_path == "int64" else contextlib.nullcontext()
        with context:
            out = torch.ops.deeperlab_d2.hough_voting(
                offsets.cuda(), weights.cuda(), *out_size, scale
            )
        assert_votes_close(out.cpu(), cpu, offsets, weights, out_size, scale)


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_cuda_kernel_single_taps_equal_cpu_kernel_bits(cuda_kernel, scale):
    # An FMA in either kernel ((y + dy) * scale - floor(...)) changes the last bits of a tap.
    if not compiled_op_available("cpu"):
        pytest.skip("compiled op not built for cpu")
    out_size = (37, 41)
    offsets, weights = single_tap_inputs(4096, 6, 7, out_size, scale, seed=3)
    cpu = torch.ops.deeperlab_d2.hough_voting(offsets, weights, *out_size, scale)
    out = torch.ops.deeperlab_d2.hough_voting(offsets.cuda(), weights.cuda(), *out_size, scale)
    assert torch.equal(out.cpu(), cpu)


# ------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile, meta tensors
# ------------------------------------------------------------------------------------------
@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not compiled_op_available(device):
        pytest.skip(f"compiled op not built for {device}")
    op = torch.ops.deeperlab_d2.hough_voting.default
    for n, k, h, w, out_size, scale in [CASES[2], CASES[4], CASES[5], CASES[8]]:
        offsets, weights = random_inputs(n, k, h, w, out_size, seed=1, device=device)
        tolerances = {}
        if device == "cuda":
            # opcheck runs the op more than once and compares the results: the CUDA kernel sums
            # with atomics in a different order each launch.
            rtol, atol = atomic_tolerances(summation_tolerance(offsets, weights, out_size, scale))
            tolerances = {"rtol": rtol, "atol": atol}
        # Default test_utils: schema, autograd registration, fake tensor, AOT dispatch.
        torch.library.opcheck(op, (offsets, weights, *out_size, scale), **tolerances)


def test_meta_tensors_give_shapes():
    offsets = torch.empty(2, 3, 2, 10, 12, device="meta")
    weights = torch.empty(2, 3, 10, 12, device="meta")
    out = hough_voting(offsets, weights, (5, 6), 0.5)
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 6)
    out = hough_voting(offsets, weights, (5, 6), 0.5, use_compiled=False)
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 6)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    if not compiled_op_available(device):
        pytest.skip(f"compiled op not built for {device}: {NOT_BUILT}")
    torch._dynamo.reset()

    def fn(offsets, weights):
        short = hough_voting(offsets, weights, (17, 33), 0.5)
        raw = torch.ops.deeperlab_d2.hough_voting(offsets, weights * 2, 17, 33, 0.5)
        return short * 3.0 + raw

    def tol(offsets, weights):
        # fn sums 5x the votes of `weights`; both the eager and the compiled run may err (CUDA
        # atomics; the CPU kernel is deterministic, and so exact here).
        return 2 * 5 * summation_tolerance(offsets, weights, (17, 33), 0.5)

    offsets, weights = random_inputs(2, 3, 34, 66, (17, 33), seed=11, device=device)
    expected = fn(offsets, weights)
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(offsets, weights)
    assert_close_to_within(out, expected, tol(offsets, weights))
    # a second call with other values reuses the graph
    offsets2, weights2 = random_inputs(2, 3, 34, 66, (17, 33), seed=12, device=device)
    assert_close_to_within(
        compiled(offsets2, weights2), fn(offsets2, weights2), tol(offsets2, weights2)
    )


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
    offsets, weights = random_inputs(1, 2, 8, 9, (8, 9), seed=0)
    with RecordOps() as rec:
        hough_voting(offsets, weights, (8, 9))
    uses_op = any(op.startswith("deeperlab_d2.hough_voting") for op in rec.ops)
    assert uses_op == HAS_COMPILED_OP
    if HAS_COMPILED_OP:
        assert compiled_op_available("cpu") and compiled_op_available(torch.device("cpu"))
        assert not any("index_add" in op for op in rec.ops)


def test_dispatch_use_compiled_false_uses_reference():
    offsets, weights = random_inputs(1, 2, 8, 9, (8, 9), seed=0)
    with RecordOps() as rec:
        out = hough_voting(offsets, weights, (8, 9), use_compiled=False)
    assert not any(op.startswith("deeperlab_d2.") for op in rec.ops)
    assert any("index_add" in op for op in rec.ops)
    torch.testing.assert_close(out, hough_voting_reference(offsets, weights, (8, 9)))


@pytest.fixture
def no_kernels(monkeypatch):
    """Simulates an extension without any kernel (as a CUDA tensor with a CPU-only build sees
    it), with the once-per-device-type warning memory reset."""
    monkeypatch.setattr(hv_module, "_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(hv_module, "_SPLAT_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(hv_module, "_WARNED_FALLBACKS", set())


def test_use_compiled_true_without_kernel_raises(no_kernels):
    offsets, weights = random_inputs(1, 1, 4, 4, (4, 4), seed=0)
    with pytest.raises(RuntimeError, match="use_compiled=True.*not available for device cpu"):
        hough_voting(offsets, weights, (4, 4), use_compiled=True)
    # the default falls back to the reference
    with pytest.warns(ReferenceFallbackWarning):
        out = hough_voting(offsets, weights, (4, 4))
    torch.testing.assert_close(out, hough_voting_reference(offsets, weights, (4, 4)))


def test_fallback_to_reference_warns_once_per_device_type(no_kernels):
    offsets, weights = random_inputs(1, 2, 6, 7, (6, 7), seed=0)
    with pytest.warns(ReferenceFallbackWarning) as record:
        out = hough_voting(offsets, weights, (6, 7))
        hough_voting(offsets, weights, (6, 7))
        hough_voting(offsets, weights, (3, 4), 0.5)
    assert len(record) == 1
    message = str(record[0].message)
    assert "hough_voting on cpu tensors runs the pure-PyTorch reference" in message
    assert "16-27x slower" in message and "once per op and device type" in message
    assert record[0].filename == __file__  # points at the caller
    torch.testing.assert_close(out, hough_voting_reference(offsets, weights, (6, 7)))

    # Another device type warns again, once; the message says why (simulated: no CUDA tensor
    # is created, the dispatch decision is taken for a CUDA device).
    with pytest.warns(ReferenceFallbackWarning) as record:
        assert not hv_module._use_compiled("hough_voting", torch.device("cuda:1"), None)
        assert not hv_module._use_compiled("hough_voting", torch.device("cuda:0"), None)
    assert len(record) == 1
    assert "hough_voting on cuda tensors" in str(record[0].message)
    if HAS_COMPILED_OP:
        assert "deeperlab_d2._C has no cuda kernel" in str(record[0].message)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hough_voting(offsets, weights, (6, 7))  # already warned for cpu
        hough_voting(offsets, weights, (6, 7), use_compiled=False)  # asked for: no warning


def test_no_fallback_warning_for_meta_or_explicit_reference(no_kernels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offsets = torch.empty(1, 2, 2, 5, 6, device="meta")
        weights = torch.empty(1, 2, 5, 6, device="meta")
        assert hough_voting(offsets, weights, (5, 6)).shape == (1, 2, 5, 6)
        offsets, weights = random_inputs(1, 2, 5, 6, (5, 6), seed=0)
        hough_voting(offsets, weights, (5, 6), use_compiled=False)
    assert not hv_module._WARNED_FALLBACKS


@needs_op
def test_no_fallback_warning_when_the_kernel_runs(monkeypatch):
    monkeypatch.setattr(hv_module, "_WARNED_FALLBACKS", set())
    offsets, weights = random_inputs(1, 2, 5, 6, (5, 6), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hough_voting(offsets, weights, (5, 6))


def test_cuda_kernel_availability_is_consistent():
    assert compiled_op_available("cuda") == (HAS_COMPILED_OP and compiled_with_cuda())
    assert compiled_op_available("cuda:1") == compiled_op_available("cuda")


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
def good_inputs(device="cpu"):
    return torch.zeros(1, 2, 2, 4, 5, device=device), torch.zeros(1, 2, 4, 5, device=device)


BAD_WRAPPER_ARGS = [
    # (id, offsets, weights, out_size, scale, error, message)
    ("offsets_4d", torch.zeros(1, 2, 4, 5), None, (4, 5), 1.0, ValueError, "offsets"),
    ("offsets_dim2", torch.zeros(1, 2, 3, 4, 5), None, (4, 5), 1.0, ValueError, "offsets"),
    ("weights_3d", None, torch.zeros(2, 4, 5), (4, 5), 1.0, ValueError, "weights"),
    ("weights_shape", None, torch.zeros(1, 2, 5, 4), (4, 5), 1.0, ValueError, "weights"),
    ("offsets_f64", torch.zeros(1, 2, 2, 4, 5).double(), None, (4, 5), 1.0, TypeError, "offsets"),
    (
        "weights_int",
        None,
        torch.zeros(1, 2, 4, 5, dtype=torch.int64),
        (4, 5),
        1.0,
        TypeError,
        "weights",
    ),
    (
        "offsets_numpy",
        np.zeros((1, 2, 2, 4, 5), np.float32),
        None,
        (4, 5),
        1.0,
        TypeError,
        "offsets",
    ),
    ("out_size_len", None, None, (4,), 1.0, TypeError, "out_size"),
    ("out_size_float", None, None, (4.0, 5), 1.0, TypeError, "out_size"),
    ("out_size_neg", None, None, (4, -1), 1.0, ValueError, "out_size"),
    ("scale_zero", None, None, (4, 5), 0.0, ValueError, "scale"),
    ("scale_neg", None, None, (4, 5), -1.0, ValueError, "scale"),
    ("scale_nan", None, None, (4, 5), math.nan, ValueError, "scale"),
    ("scale_inf", None, None, (4, 5), math.inf, ValueError, "scale"),
    ("scale_str", None, None, (4, 5), "1", TypeError, "scale"),
]


@pytest.mark.parametrize("use_compiled", [None, False])
@pytest.mark.parametrize(
    "offsets, weights, out_size, scale, error, message",
    [case[1:] for case in BAD_WRAPPER_ARGS],
    ids=[case[0] for case in BAD_WRAPPER_ARGS],
)
def test_wrapper_rejects_bad_inputs(
    offsets, weights, out_size, scale, error, message, use_compiled
):
    good_off, good_w = good_inputs()
    offsets = good_off if offsets is None else offsets
    weights = good_w if weights is None else weights
    with pytest.raises(error, match=message):
        hough_voting(offsets, weights, out_size, scale, use_compiled=use_compiled)
    with pytest.raises(error, match=message):
        hough_voting_reference(offsets, weights, out_size, scale)


def test_wrapper_rejects_device_mismatch():
    off, w = good_inputs()
    with pytest.raises(ValueError, match="same device.*offsets on meta and weights on cpu"):
        hough_voting(off.to("meta"), w, (4, 5))
    with pytest.raises(ValueError, match="same device"):
        hough_voting_reference(off, w.to("meta"), (4, 5))


BAD_OP_ARGS = [
    ("offsets_4d", torch.zeros(1, 2, 4, 5), None, 4, 5, 1.0, "offsets must be a 5-D tensor"),
    ("offsets_dim2", torch.zeros(1, 2, 3, 4, 5), None, 4, 5, 1.0, "offsets must have size 2"),
    ("weights_3d", None, torch.zeros(2, 4, 5), 4, 5, 1.0, "weights must be a 4-D tensor"),
    ("weights_shape", None, torch.zeros(1, 2, 5, 4), 4, 5, 1.0, "weights shape .* does not match"),
    (
        "offsets_f64",
        torch.zeros(1, 2, 2, 4, 5).double(),
        None,
        4,
        5,
        1.0,
        "offsets must be float32",
    ),
    ("weights_f16", None, torch.zeros(1, 2, 4, 5).half(), 4, 5, 1.0, "weights must be float32"),
    ("out_h_neg", None, None, -1, 5, 1.0, "out_h and out_w must be >= 0"),
    ("out_w_neg", None, None, 4, -2, 1.0, "out_h and out_w must be >= 0"),
    ("scale_zero", None, None, 4, 5, 0.0, "scale must be finite and > 0"),
    ("scale_nan", None, None, 4, 5, math.nan, "scale must be finite and > 0"),
    ("scale_inf", None, None, 4, 5, math.inf, "scale must be finite and > 0"),
]


@needs_op
@pytest.mark.parametrize("device", ["cpu", "meta", CUDA])  # meta: the fake implementation
@pytest.mark.parametrize(
    "offsets, weights, out_h, out_w, scale, message",
    [case[1:] for case in BAD_OP_ARGS],
    ids=[case[0] for case in BAD_OP_ARGS],
)
def test_raw_op_rejects_bad_inputs(device, offsets, weights, out_h, out_w, scale, message):
    if not compiled_op_available(device):
        pytest.skip(f"compiled op not built for {device}")
    good_off, good_w = good_inputs(device)
    offsets = good_off if offsets is None else offsets.to(device)
    weights = good_w if weights is None else weights.to(device)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deeperlab_d2.hough_voting(offsets, weights, out_h, out_w, scale)


@needs_op
@pytest.mark.parametrize("other", ["meta", CUDA])
def test_raw_op_rejects_device_mismatch(other):
    if not compiled_op_available(other):
        pytest.skip(f"compiled op not built for {other}")
    off, w = good_inputs()
    with pytest.raises(RuntimeError, match="offsets and weights must be on the same device"):
        torch.ops.deeperlab_d2.hough_voting(off.to(other), w, 4, 5, 1.0)
    with pytest.raises(RuntimeError, match="offsets and weights must be on the same device"):
        torch.ops.deeperlab_d2.hough_voting(off, w.to(other), 4, 5, 1.0)
