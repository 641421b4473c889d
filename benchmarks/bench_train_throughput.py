#!/usr/bin/env python
"""Training throughput of a config under several settings: seconds per training step.

Each variant (a list of config overrides) runs in its own process: the model, optimizer and
training data loader are built as ``train_net.py`` builds them (:class:`deeperlab_d2.engine.
Trainer`), ``--warmup`` steps run, then ``--steps`` steps are timed (wall clock, data loading
included). The variants are run in turn, ``--rounds`` times, so that a change in the machine's
load hits them alike; the table gives each round's s/step, their mean and the ratio to the
first variant.

    python benchmarks/bench_train_throughput.py --config-file \\
        configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml \\
        [--steps 40] [--warmup 5] [--rounds 3]

The default variants compare the data loader in a worker process (``DATALOADER.NUM_WORKERS 1``)
or in the training process (0), with and without channels-last weights
(``MODEL.DEEPERLAB.CHANNELS_LAST``). Other variants: ``--variant "KEY VALUE ..."`` (repeatable).
"""

import argparse
import statistics
import subprocess
import sys

DEFAULT_VARIANTS = [
    "DATALOADER.NUM_WORKERS 1 MODEL.DEEPERLAB.CHANNELS_LAST False",
    "DATALOADER.NUM_WORKERS 0 MODEL.DEEPERLAB.CHANNELS_LAST False",
    "DATALOADER.NUM_WORKERS 1 MODEL.DEEPERLAB.CHANNELS_LAST True",
    "DATALOADER.NUM_WORKERS 0 MODEL.DEEPERLAB.CHANNELS_LAST True",
]


def time_steps(config_file, opts, steps, warmup):
    """Mean wall-clock seconds of ``steps`` training steps after ``warmup`` steps."""
    import torch
    from detectron2.config import get_cfg

    from deeperlab_d2.config import add_deeperlab_config
    from deeperlab_d2.engine import measure_step_time

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return measure_step_time(cfg, steps, warmup), torch.get_num_threads()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", help="config overrides, one string")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one variant
    args = parser.parse_args(argv)
    if args.one is not None:
        per_step, threads = time_steps(args.config_file, args.one.split(), args.steps, args.warmup)
        print(f"RESULT {per_step:.4f} {threads}")
        return 0
    variants = args.variant or DEFAULT_VARIANTS
    times = {v: [] for v in variants}
    threads = None
    for r in range(args.rounds):
        for v in variants:
            cmd = [
                sys.executable,
                __file__,
                "--config-file",
                args.config_file,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--one",
                v,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            per_step, threads = float(line.split()[1]), int(line.split()[2])
            times[v].append(per_step)
            print(f"[round {r + 1}] {v}: {per_step:.3f} s/step", flush=True)
    base = statistics.mean(times[variants[0]])
    print(
        f"\n{args.steps} timed steps after {args.warmup}, {threads} threads, {args.rounds} round(s)"
    )
    print("\n| variant | s/step per round | mean | speed-up vs the first |")
    print("|---|---|---|---|")
    for v in variants:
        mean = statistics.mean(times[v])
        rounds = ", ".join(f"{t:.3f}" for t in times[v])
        print(f"| `{v}` | {rounds} | {mean:.3f} | {base / mean:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
