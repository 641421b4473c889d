#!/usr/bin/env python
"""DeeperLab vs Detectron2's Panoptic-DeepLab, same backbone, same data, same schedule.

    python benchmarks/compare_panoptic_deeplab.py [--iters N] [--output DIR] [KEY VALUE ...]

Trains two models one after the other in this process, on the built-in synthetic dataset
(``python datasets/prepare_synthetic.py`` first), and evaluates both with the evaluators of
``train_net.py`` (PQ, Parsing Covering, mIoU):

* DeeperLab: the tiny config (``configs/synthetic/...tiny...yaml``), extra ``KEY VALUE`` pairs
  applied to it;
* Panoptic-DeepLab (``detectron2.projects.panoptic_deeplab``): the SAME backbone (width-0.5
  W-MNV2, output stride 16, built by the same config keys), the same input pipeline (sizes,
  crop, flip), optimizer, LR schedule, batch size and iteration count, with its own
  dual-ASPP/dual-decoder heads made as narrow as DeeperLab's (ASPP 64, decoder 32, heads 32,
  depthwise-separable convs). Its center Gaussian sigma and peak kernel are scaled to the small
  objects of the data like DeeperLab's keypoint radius (sigma 3 px, kernel 3).

Training time per iteration is the mean wall time of ``run_step`` (data loading included) over
the iterations after the first 10. Both models run with the same thread count, one after the
other, so the ratio is measured in one run; absolute times depend on the machine's load.
"""

import argparse
import json
import logging
import os
import sys
import time

from detectron2.engine import HookBase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TINY_CONFIG = os.path.join(
    REPO, "configs", "synthetic", "deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)
WARMUP_STEPS = 10


def base_cfg(iters, output_dir, opts):
    from detectron2.config import get_cfg

    from deeperlab_d2 import add_deeperlab_config

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(list(opts))
    if iters is not None:
        cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # only model_final
    cfg.TEST.EVAL_PERIOD = 0  # one evaluation, after training
    cfg.OUTPUT_DIR = output_dir
    return cfg


def panoptic_deeplab_cfg(cfg):
    """Panoptic-DeepLab on DeeperLab's tiny backbone/input/solver settings."""
    from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

    cfg = cfg.clone()
    cfg.defrost()
    d = cfg.MODEL.DEEPERLAB
    solver = {k: cfg.SOLVER[k] for k in ("OPTIMIZER", "POLY_LR_POWER", "LR_SCHEDULER_NAME")}
    add_panoptic_deeplab_config(cfg)  # also sets some SOLVER keys: restore ours
    for k, v in solver.items():
        cfg.SOLVER[k] = v
    cfg.MODEL.META_ARCHITECTURE = "PanopticDeepLab"
    features = [d.LOW_LEVEL_FEATURE, "res3", d.IN_FEATURE]
    for head in (cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.INS_EMBED_HEAD):
        head.IN_FEATURES = features
        head.PROJECT_FEATURES = features[:2]
        head.PROJECT_CHANNELS = [d.DECODER.LOW_LEVEL_CHANNELS, 2 * d.DECODER.LOW_LEVEL_CHANNELS]
        head.ASPP_CHANNELS = d.ASPP.CHANNELS
        head.ASPP_DILATIONS = list(d.ASPP.DILATIONS)
        head.ASPP_DROPOUT = d.ASPP.DROPOUT
        head.CONVS_DIM = d.DECODER.OUT_CHANNELS
        head.COMMON_STRIDE = 4
        head.NORM = d.NORM
    cfg.MODEL.SEM_SEG_HEAD.NAME = "PanopticDeepLabSemSegHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = d.NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.HEAD_CHANNELS = d.SEM_SEG_HEAD_CHANNELS
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "hard_pixel_mining"
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TOP_K = d.LOSS.SEM_SEG_TOP_K_RATIO
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.INS_EMBED_HEAD.HEAD_CHANNELS = d.INSTANCE_HEAD_CHANNELS
    cfg.INPUT.SMALL_INSTANCE_AREA = d.TARGETS.SMALL_INSTANCE_AREA
    cfg.INPUT.SMALL_INSTANCE_WEIGHT = d.TARGETS.SMALL_INSTANCE_WEIGHT
    cfg.INPUT.GAUSSIAN_SIGMA = 3
    p = cfg.MODEL.PANOPTIC_DEEPLAB
    p.USE_DEPTHWISE_SEPARABLE_CONV = True
    cfg.MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV = True
    p.NMS_KERNEL = 3
    p.STUFF_AREA = d.POST_PROCESS.STUFF_AREA
    p.SIZE_DIVISIBILITY = 32
    p.PREDICT_INSTANCES = False  # PQ / PC / mIoU only
    return cfg


class StepTimer(HookBase):
    """Wall time of every ``run_step`` after the first WARMUP_STEPS."""

    def __init__(self):
        self.times = []
        self._t0 = 0.0

    def before_step(self):
        self._t0 = time.perf_counter()

    def after_step(self):
        if self.trainer.iter - self.trainer.start_iter >= WARMUP_STEPS:
            self.times.append(time.perf_counter() - self._t0)

    @property
    def mean(self):
        return sum(self.times) / max(len(self.times), 1)


def trainer_class(kind):
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    import train_net

    if kind == "deeperlab":
        return train_net.Trainer

    class PanopticDeepLabTrainer(train_net.Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            from detectron2.projects.panoptic_deeplab import PanopticDeeplabDatasetMapper

            return build_detection_train_loader(cfg, mapper=PanopticDeeplabDatasetMapper(cfg))

        @classmethod
        def build_model(cls, cfg):
            # Its ASPP pools over a fixed window computed from the crop size, which breaks on
            # images smaller than the crop; without the crop size it pools globally, as
            # DeeperLab's ASPP does.
            model_cfg = cfg.clone()
            model_cfg.defrost()
            model_cfg.INPUT.CROP.ENABLED = False
            model = build_model(model_cfg)
            logging.getLogger("deeperlab_d2").info(f"Panoptic-DeepLab model:\n{model}")
            return model

    return PanopticDeepLabTrainer


def train_and_evaluate(kind, cfg):
    from detectron2.engine import default_setup

    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    default_setup(cfg, argparse.Namespace(config_file="", opts=[], eval_only=False, resume=False))
    trainer = trainer_class(kind)(cfg)
    timer = StepTimer()
    trainer.register_hooks([timer])
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None) or {}
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"results": results, "time_per_iter": timer.mean, "params": params}


def row(name, r):
    res = r["results"]
    pq, pc = res.get("panoptic_seg", {}), res.get("parsing_covering", {})
    sem = res.get("sem_seg", {})
    cells = [
        pq.get("PQ"),
        pq.get("PQ_th"),
        pq.get("PQ_st"),
        pc.get("PC"),
        sem.get("mIoU"),
        r["time_per_iter"],
        r["params"] / 1e6,
    ]
    fmt = ["{:.2f}"] * 5 + ["{:.3f}", "{:.2f}"]
    text = ["-" if c is None else f.format(c) for f, c in zip(fmt, cells)]
    return f"| {name} | " + " | ".join(text) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=None, help="default: the config's MAX_ITER")
    parser.add_argument("--output", default="output/compare_panoptic_deeplab")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="DeeperLab config KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters <= WARMUP_STEPS:
        parser.error(f"--iters must be > {WARMUP_STEPS}")

    import detectron2.projects.panoptic_deeplab  # noqa: F401  (registers its model)

    import deeperlab_d2  # noqa: F401  (registers the synthetic dataset)

    dl_cfg = base_cfg(args.iters, os.path.join(args.output, "deeperlab"), args.opts)
    iters = dl_cfg.SOLVER.MAX_ITER
    runs = {}
    runs["DeeperLab"] = train_and_evaluate("deeperlab", dl_cfg)
    pdl_cfg = panoptic_deeplab_cfg(dl_cfg)
    pdl_cfg.OUTPUT_DIR = os.path.join(args.output, "panoptic_deeplab")
    runs["Panoptic-DeepLab"] = train_and_evaluate("panoptic_deeplab", pdl_cfg)

    lines = [
        f"{iters} iterations each, batch {dl_cfg.SOLVER.IMS_PER_BATCH}, synthetic val",
        "| model | PQ | PQ things | PQ stuff | PC | mIoU | s / iter | params (M) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, r) for name, r in runs.items()]
    a, b = runs["DeeperLab"], runs["Panoptic-DeepLab"]
    ratio = a["time_per_iter"] / max(b["time_per_iter"], 1e-9)
    lines.append(f"DeeperLab / Panoptic-DeepLab training time per iteration: {ratio:.2f}x")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.output, "comparison.json"), "w") as f:
        json.dump(runs, f, indent=1, default=float)
    with open(os.path.join(args.output, "comparison.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
