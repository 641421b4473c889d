"""Times the compiled Hough-voting op against the pure-PyTorch reference on the same inputs, and
the dense op against its sparse entry point ``splat_points``.

Usage::

    python benchmarks/bench_hough_voting.py                 # CPU, 1025x2049 and 513x1025
    python benchmarks/bench_hough_voting.py --device cuda
    python benchmarks/bench_hough_voting.py --sizes 257x513 --repeats 20 --threads 1
    python benchmarks/bench_hough_voting.py --splat-fractions 0.05 0.1 1.0

Inputs look like a real offset field: every pixel of channel k points at the nearest of ~30
random keypoints of that channel, plus Gaussian noise; weights are uniform in [0, 1]. Prints a
markdown table (median of several repeats after a warm-up) and the speedups.

Second table: ``splat_points`` fed the pixels whose weight is in the top fraction (10% and 100%
by default; map-major order, as ``nonzero()`` of a mask gives them) against the dense op on the
whole field with the other weights zeroed (same output). "select ms" is the caller's cost of
building the points (threshold mask, nonzero, gathers), not included in "splat ms".
"""

import argparse
import functools
import math
import statistics
import sys
import time

import torch

from deeperlab_d2.layers import (
    HAS_COMPILED_OP,
    compiled_op_available,
    hough_voting,
    hough_voting_reference,
    splat_points,
)


def make_field(n, k, h, w, num_keypoints=30, noise=2.0, seed=0):
    """A synthetic [N, K, 2, H, W] offset field converging on keypoints, and [N, K, H, W] weights.

    Args:
        n, k, h, w: sizes.
        num_keypoints: keypoints per (image, channel); each pixel points at the nearest one.
        noise: standard deviation (pixels) of the noise added to the offsets.
        seed: RNG seed.

    Returns:
        (offsets, weights), float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w).reshape(-1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w).reshape(-1)
    offsets = torch.empty(n, k, 2, h * w)
    for i in range(n):
        for j in range(k):
            kp = torch.rand(num_keypoints, 2, generator=gen) * torch.tensor([h - 1.0, w - 1.0])
            nearest = torch.empty(h * w, dtype=torch.long)
            chunk = 1 << 18
            for s in range(0, h * w, chunk):
                d = (ys[s : s + chunk, None] - kp[:, 0]) ** 2 + (
                    xs[s : s + chunk, None] - kp[:, 1]
                ) ** 2
                nearest[s : s + chunk] = d.argmin(dim=1)
            offsets[i, j, 0] = kp[nearest, 0] - ys
            offsets[i, j, 1] = kp[nearest, 1] - xs
    offsets += torch.randn(offsets.shape, generator=gen) * noise
    weights = torch.rand(n, k, h, w, generator=gen)
    return offsets.view(n, k, 2, h, w), weights


def weight_threshold(weights, fraction):
    """The weight above which about ``fraction`` of the pixels lie (-inf for all of them)."""
    if fraction >= 1:
        return -math.inf
    return torch.quantile(weights.flatten()[:1_000_000].float(), 1 - fraction).item()


def select_points(offsets, weights, threshold):
    """The pixels whose weight is above ``threshold``, as splat_points input (what a caller
    voting only from the pixels that carry weight does).

    Returns:
        (points [M, 2], weights [M], map_index [M], keep [N, K, H, W]): positions
        (y + dy, x + dx), map n * K + k (map-major order), and the mask of the pixels kept.
    """
    n, k, _, h, w = offsets.shape
    keep = weights > threshold
    index = keep.flatten().nonzero().squeeze(1)  # map-major order
    plane, pixel = index // (h * w), index % (h * w)
    at_dy = plane * (2 * h * w) + pixel  # flat index of dy in [N, K, 2, H, W]; dx is h * w on
    flat = offsets.reshape(-1)
    # (y + dy, x + dx) rounded to float32 as hough_voting does
    y = (pixel // w).float() + flat.index_select(0, at_dy)
    x = (pixel % w).float() + flat.index_select(0, at_dy + h * w)
    return torch.stack([y, x], dim=1), weights.reshape(-1).index_select(0, index), plane, keep


def time_ms(fn, repeats, warmup, device):
    """Median wall time of ``fn()`` in milliseconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parse_size(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--sizes", nargs="+", default=["1025x2049", "513x1025"], help="HxW")
    parser.add_argument("-n", type=int, default=1, help="images (N)")
    parser.add_argument("-k", type=int, default=5, help="channels (K, keypoint types)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the op")
    parser.add_argument("--ref-repeats", type=int, default=3, help="timed runs of the reference")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch.get_num_threads())"
    )
    parser.add_argument(
        "--splat-fractions",
        type=float,
        nargs="*",
        default=[0.1, 1.0],
        help="fractions of the pixels fed to splat_points (none: skip the comparison)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if not compiled_op_available(device):
        sys.exit(
            f"the compiled op is not available for {device.type} (HAS_COMPILED_OP="
            f"{HAS_COMPILED_OP}): build it with `python setup.py build_ext --inplace`"
        )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, device {where}, threads {torch.get_num_threads()}, "
        f"N={args.n}, K={args.k}, median of {args.ref_repeats} (reference) / {args.repeats} "
        f"(op) runs after {args.warmup} warm-up runs\n"
    )
    rows = []
    splat_rows = []
    for size in args.sizes:
        h, w = parse_size(size)
        offsets, weights = make_field(args.n, args.k, h, w)
        offsets, weights = offsets.to(device), weights.to(device)

        run_ref = functools.partial(hough_voting_reference, offsets, weights, (h, w))
        run_op = functools.partial(hough_voting, offsets, weights, (h, w), use_compiled=True)

        ref = run_ref()
        # summation order differs: report the largest difference relative to the largest value
        diff = ((run_op() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        ref_ms = time_ms(run_ref, args.ref_repeats, min(args.warmup, 1), device)
        op_ms = time_ms(run_op, args.repeats, args.warmup, device)
        rows.append((f"{h}x{w}", ref_ms, op_ms, ref_ms / op_ms, diff))

        if args.splat_fractions and compiled_op_available(device, op="splat_points"):
            for fraction in args.splat_fractions:
                threshold = weight_threshold(weights, fraction)
                select = functools.partial(select_points, offsets, weights, threshold)
                points, pw, maps, keep = select()
                select_ms = time_ms(select, args.ref_repeats, min(args.warmup, 1), device)
                masked = torch.where(keep, weights, 0.0)
                run_dense = functools.partial(
                    hough_voting, offsets, masked, (h, w), use_compiled=True
                )
                run_splat = functools.partial(
                    splat_points, points, pw, maps, args.n * args.k, (h, w), use_compiled=True
                )
                dense = run_dense()
                diff = (run_splat().view_as(dense) - dense).abs().max() / dense.abs().max()
                dense_ms = time_ms(run_dense, args.repeats, args.warmup, device)
                splat_ms = time_ms(run_splat, args.repeats, args.warmup, device)
                splat_rows.append(
                    (f"{h}x{w}", fraction, len(pw), dense_ms, splat_ms, select_ms, diff.item())
                )

    print("| size (HxW) | reference ms | op ms | speedup | max diff / max value |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for size, ref_ms, op_ms, speedup, diff in rows:
        print(f"| {size} | {ref_ms:.1f} | {op_ms:.2f} | {speedup:.1f}x | {diff:.2e} |")
    print()
    for size, _, _, speedup, _ in rows:
        print(f"speedup at {size}: {speedup:.1f}x")

    if splat_rows:
        print(
            f"\nsplat_points on the top pixels vs the dense op with the other weights zeroed "
            f"(N={args.n}, K={args.k}, same output)\n"
        )
        print(
            "| size (HxW) | pixels | points M | dense op ms | splat ms | dense/splat | "
            "select ms | max diff / max value |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size, fraction, m, dense_ms, splat_ms, select_ms, diff in splat_rows:
            print(
                f"| {size} | {fraction:.0%} | {m} | {dense_ms:.2f} | {splat_ms:.2f} | "
                f"{dense_ms / splat_ms:.2f}x | {select_ms:.1f} | {diff:.2e} |"
            )
        print()
        for size, fraction, _, dense_ms, splat_ms, _, _ in splat_rows:
            print(
                f"dense op / splat_points ({fraction:.0%} of the pixels) at {size}: "
                f"{dense_ms / splat_ms:.2f}x"
            )


if __name__ == "__main__":
    main()
