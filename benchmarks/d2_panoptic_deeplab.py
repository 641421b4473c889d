#!/usr/bin/env python
"""Train and evaluate Detectron2's own Panoptic-DeepLab project with the plugin's data,
backbones, solver and evaluators (the reference point of ``benchmarks/learning_curve.py``).

The model, its targets (``PanopticDeeplabDatasetMapper``), losses and post-processing are
Detectron2's (``detectron2.projects.panoptic_deeplab``); the backbone (``MODEL.BACKBONE.NAME``,
e.g. the plugin's MobileNetV2), the optimizer and poly schedule (``SOLVER.*``), the checkpoints
that resume exactly, and the evaluators (PQ, Parsing Covering, mIoU, AP) are the plugin's
:class:`deeperlab_d2.engine.Trainer`'s, so that a comparison with the plugin's two instance
representations differs only in the model. Same command line as ``train_net.py``:

    python benchmarks/d2_panoptic_deeplab.py --config-file \\
        configs/synthetic/d2_panoptic_deeplab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml \\
        [--resume] [--eval-only MODEL.WEIGHTS <checkpoint>] [KEY VALUE ...]
"""

import logging
import sys
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.projects.panoptic_deeplab import (
    PanopticDeeplabDatasetMapper,
    add_panoptic_deeplab_config,
)
from detectron2.utils.logger import setup_logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_net's report()

from deeperlab_d2.checkpoint import load_model_weights  # noqa: E402
from deeperlab_d2.config import add_deeperlab_config  # noqa: E402
from deeperlab_d2.engine import Trainer  # noqa: E402
from train_net import report  # noqa: E402


class D2PanopticDeepLabTrainer(Trainer):
    """The plugin's trainer with Detectron2's Panoptic-DeepLab dataset mapper (its targets:
    center heatmap, offsets, loss weights)."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=PanopticDeeplabDatasetMapper(cfg))


def setup(args):
    cfg = get_cfg()
    add_deeperlab_config(cfg)  # the plugin's backbones and solver keys
    add_panoptic_deeplab_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, name="deeperlab_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = D2PanopticDeepLabTrainer.build_model(cfg)
        load_model_weights(model, cfg.MODEL.WEIGHTS)
        return report(D2PanopticDeepLabTrainer.test(cfg, model), cfg.DATASETS.TEST)
    trainer = D2PanopticDeepLabTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    return report(getattr(trainer, "_last_eval_results", None), cfg.DATASETS.TEST)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, args=(args,))
