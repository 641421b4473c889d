#!/usr/bin/env python
"""Oracle check of the post-processing: ideal head outputs from the ground truth, real inference.

    python benchmarks/oracle_pq.py [--root DIR] [--split val] [--config CFG] [--cases] \
        [KEY VALUE ...]

e.g. ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION center`` for Panoptic-DeepLab's centers. For
each image of the synthetic split (``python datasets/prepare_synthetic.py --root DIR``), or of
the hand-built representation cases with ``--cases``, it builds the ideal outputs of the cfg's
instance branch from the ground truth, runs the real post-processing, scores it with
panopticapi and prints the PQ table and the hard-case table. The logic lives in
:mod:`deeperlab_d2.evaluation.oracle` (see there for the ideal outputs and the hard cases).
"""

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(
    REPO, "configs", "synthetic", "deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--config", default=TINY_CONFIG)
    parser.add_argument(
        "--cases", action="store_true", help="the hand-built representation cases instead"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)

    from detectron2.config import get_cfg

    from deeperlab_d2 import add_deeperlab_config
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic
    from deeperlab_d2.evaluation.oracle import (
        hard_case_table,
        pq_table,
        register_representation_cases,
        run_oracle,
    )

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(list(args.opts))
    with tempfile.TemporaryDirectory(prefix="oracle_cases_") as tmp:
        if args.cases:
            name, row = register_representation_cases(tmp), "cases"
        else:
            register_deeperlab_synthetic(args.root, prefix="oracle_synthetic")
            name, row = f"oracle_synthetic_{args.split}", args.split
        pq, table = run_oracle(cfg, name)
    print(f"instance representation: {cfg.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION}")
    print()
    print(pq_table({row: pq}))
    print()
    print(hard_case_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
