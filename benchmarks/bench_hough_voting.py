"""Times the compiled Hough-voting op against the pure-PyTorch reference on the same inputs.

Usage::

    python benchmarks/bench_hough_voting.py                 # CPU, 1025x2049 and 513x1025
    python benchmarks/bench_hough_voting.py --device cuda
    python benchmarks/bench_hough_voting.py --sizes 257x513 --repeats 20 --threads 1

Inputs look like a real offset field: every pixel of channel k points at the nearest of ~30
random keypoints of that channel, plus Gaussian noise; weights are uniform in [0, 1]. Prints a
markdown table (median of several repeats after a warm-up) and the speedups.
"""

import argparse
import functools
import statistics
import sys
import time

import torch

from deeperlab_d2.layers import (
    HAS_COMPILED_OP,
    compiled_op_available,
    hough_voting,
    hough_voting_reference,
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

    print("| size (HxW) | reference ms | op ms | speedup | max diff / max value |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for size, ref_ms, op_ms, speedup, diff in rows:
        print(f"| {size} | {ref_ms:.1f} | {op_ms:.2f} | {speedup:.1f}x | {diff:.2e} |")
    print()
    for size, _, _, speedup, _ in rows:
        print(f"speedup at {size}: {speedup:.1f}x")


if __name__ == "__main__":
    main()
