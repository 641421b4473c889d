#!/usr/bin/env python
"""Profile training steps of a config on the CPU: where one iteration's time goes.

Builds the model, optimizer and training data loader exactly as ``train_net.py`` does
(:class:`deeperlab_d2.engine.Trainer`), runs ``--warmup`` steps, then ``--steps`` steps under
``torch.profiler`` and prints the operators with the largest self CPU time (forward, backward
and optimizer together) and the mean wall time per step.

    python benchmarks/profile_train_step.py --config-file \\
        configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml \\
        [--steps 10] [--warmup 3] [--rows 15] [KEY VALUE ...]
"""

import argparse
import time

import torch
from detectron2.config import get_cfg
from torch.profiler import ProfilerActivity, profile

from deeperlab_d2.config import add_deeperlab_config
from deeperlab_d2.engine import training_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    step = training_step(cfg)
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per_step = (time.perf_counter() - t0) / args.steps
    print(
        f"{args.steps} steps, {torch.get_num_threads()} threads, batch "
        f"{cfg.SOLVER.IMS_PER_BATCH}: {per_step:.3f} s/step under the profiler (data loading in "
        f"{cfg.DATALOADER.NUM_WORKERS} worker(s) overlaps)\n"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
