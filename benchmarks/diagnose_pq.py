#!/usr/bin/env python
"""Where does a trained DeeperLab lose PQ? Swap its head outputs for ideal ones, branch by branch.

    python benchmarks/diagnose_pq.py --config-file CFG --weights output/.../model_final.pth \
        [--root datasets] [--split val] [KEY VALUE ...]

For every image of the synthetic split it runs the model once, then scores (panopticapi PQ)
four mixtures of the model's outputs with the ideal outputs of ``oracle_pq.py``:

* ``model``: everything predicted (what ``train_net.py --eval-only`` measures);
* ``ideal semantics``: predicted keypoints/offsets, ground-truth semantics: the PQ lost to the
  instance branch is ``ideal - this``;
* ``ideal instances``: predicted semantics, ideal heatmaps and offsets;
* ``ideal``: the oracle (the post-processing's own ceiling).

It also prints the semantic confusion matrix (rows: ground-truth class, % of its pixels;
columns: predicted class), which tells thing/stuff confusion from confusion among things.

Only for the synthetic dataset (images are scored at their own size, 192x256).
"""

import argparse
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import oracle_pq  # noqa: E402

VARIANTS = ("model", "ideal semantics", "ideal instances", "ideal")


def load_model(config_file, weights, opts):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from deeperlab_d2 import add_deeperlab_config

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model


def model_outputs(model, file_name):
    from deeperlab_d2.data import read_image_or_raise

    image = read_image_or_raise(file_name, "RGB")  # [H, W, 3] uint8
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    h, w = x.shape[-2:]
    div = model.size_divisibility
    if div and (h % div or w % div):
        raise ValueError(f"{file_name}: {h}x{w} is not a multiple of {div}")
    x = (x - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    with torch.no_grad():
        out = model.predict(x[None])
    names = ("sem_seg", "heatmap", "short_offsets", "mid_offsets", "long_offsets")
    return tuple(out[k] for k in names)


def diagnose(root, split, config_file, weights, opts=()):
    model = load_model(config_file, weights, opts)
    cache = {}

    def predicted(rec):
        key = rec["file_name"]
        if key not in cache:
            cache[key] = model_outputs(model, key)
        return cache[key]

    mixers = {
        "model": lambda rec, ideal: predicted(rec),
        "ideal semantics": lambda rec, ideal: (ideal[0], *predicted(rec)[1:]),
        "ideal instances": lambda rec, ideal: (predicted(rec)[0], *ideal[1:]),
        "ideal": None,
    }
    rows = {}
    for name in VARIANTS:
        pq, _ = oracle_pq.run_oracle(
            root, split, config_file, verbose=False, make_outputs=mixers[name], opts=opts
        )
        rows[name] = pq
    return rows, confusion_matrix(cache, split)


def confusion_matrix(cache, split):
    """[C, C] pixel counts (ground truth x prediction) over the images in ``cache``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    name = f"oracle_synthetic_{split}"  # registered by oracle_pq.run_oracle
    classes = MetadataCatalog.get(name).stuff_classes
    C = len(classes)
    counts = np.zeros((C, C), dtype=np.int64)
    for rec in DatasetCatalog.get(name):
        pred = cache[rec["file_name"]][0][0].argmax(0).numpy()
        gt = np.asarray(Image.open(rec["sem_seg_file_name"])).astype(np.int64)
        valid = gt < C
        counts += np.bincount(gt[valid] * C + pred[valid], minlength=C * C).reshape(C, C)
    return classes, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--split", default="val")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    for path in (args.config_file, args.weights):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    rows, (classes, counts) = diagnose(
        args.root, args.split, args.config_file, args.weights, args.opts
    )
    print("| outputs | PQ | SQ | RQ | PQ things | RQ things | PQ stuff |")
    print("|---|---|---|---|---|---|---|")
    for name, pq in rows.items():
        a, t, s = pq["All"], pq["Things"], pq["Stuff"]
        print(
            f"| {name} | {100 * a['pq']:.2f} | {100 * a['sq']:.2f} | {100 * a['rq']:.2f} "
            f"| {100 * t['pq']:.2f} | {100 * t['rq']:.2f} | {100 * s['pq']:.2f} |"
        )
    print()
    print("| ground truth \\ predicted (% of pixels) | " + " | ".join(classes) + " |")
    print("|---|" + "---|" * len(classes))
    share = 100.0 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    for name, row in zip(classes, share):
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
