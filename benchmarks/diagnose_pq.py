#!/usr/bin/env python
"""Where does a trained DeeperLab lose PQ? Swap its head outputs for ideal ones, branch by branch.

    python benchmarks/diagnose_pq.py --config-file CFG --weights output/.../model_final.pth \
        [--root datasets] [--split val] [--dataset NAME] [KEY VALUE ...]

For every image of the synthetic split (or of any registered COCO-panoptic dataset named by
``--dataset`` whose images have the size of their annotations) it runs the model once, through
its own preprocessing and heads (:meth:`DeeperLab.run_heads`), then scores (panopticapi PQ),
through the oracle of :mod:`deeperlab_d2.evaluation.oracle` (the real post-processing of the
cfg's instance representation), four mixtures of the model's outputs with the ideal ones:

* ``model``: everything predicted (what ``train_net.py --eval-only`` measures at this size);
* ``ideal semantics``: predicted instance outputs (keypoints and offsets, or center heatmap
  and offsets), ground-truth semantics: the PQ lost to the instance branch is
  ``ideal - this``;
* ``ideal instances``: predicted semantics, ideal instance outputs;
* ``ideal``: the oracle (the post-processing's own ceiling).

It also prints the semantic confusion matrix (rows: ground-truth class, % of its pixels;
columns: predicted class), which tells thing/stuff confusion from confusion among things.
"""

import argparse
import os
import sys

import numpy as np
import torch

VARIANTS = ("model", "ideal semantics", "ideal instances", "ideal")


def load_model(config_file, weights, opts=()):
    """(model in eval mode on the CPU with ``weights``, its cfg)."""
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
    return model, cfg


def model_outputs(model, image_format, record):
    """The model's head outputs for one record's image (batch of one, float32, on the CPU),
    cropped to the image's size (the model pads it to its size divisibility)."""
    from panopticapi.utils import rgb2id
    from PIL import Image

    from deeperlab_d2.data import read_image_or_raise

    image = read_image_or_raise(record["file_name"], image_format)  # [H, W, 3] uint8
    h, w = image.shape[:2]
    gt_size = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"))).shape
    if (h, w) != gt_size:
        raise ValueError(
            f"{record['file_name']}: image {h}x{w} is not the size of its panoptic annotation "
            f"{gt_size[0]}x{gt_size[1]}; the diagnosis scores images at their own size"
        )
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.no_grad():
        ((_, outputs, sizes),) = model.run_heads([{"image": x}])
    (vh, vw) = sizes[0]
    return {k: v[..., :vh, :vw].float().cpu() for k, v in outputs.items()}


def diagnose(root, split, config_file, weights, opts=(), dataset_name=None):
    """Returns ``(rows, (classes, counts))``: panopticapi results per :data:`VARIANTS` and
    :func:`confusion_matrix`. ``dataset_name`` replaces the synthetic ``root`` / ``split``."""
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic
    from deeperlab_d2.evaluation.oracle import run_oracle

    model, cfg = load_model(config_file, weights, opts)
    if dataset_name is None:
        register_deeperlab_synthetic(root, prefix="diagnose_synthetic")
        dataset_name = f"diagnose_synthetic_{split}"
    instance_names = model.instance_branch.output_names
    cache = {}

    def predicted(rec):
        key = rec["file_name"]
        if key not in cache:
            cache[key] = model_outputs(model, cfg.INPUT.FORMAT, rec)
        return cache[key]

    def mixer(semantics, instances):
        """``make_outputs`` taking ``sem_seg`` and the instance branch's outputs (its
        ``output_names``) from the model or from the ideal outputs."""

        def make_outputs(rec, ideal):
            def pick(which):
                return ideal if which == "ideal" else predicted(rec)

            return {
                "sem_seg": pick(semantics)["sem_seg"],
                **{k: pick(instances)[k] for k in instance_names},
            }

        return make_outputs

    mixers = {
        "model": mixer("model", "model"),
        "ideal semantics": mixer("ideal", "model"),
        "ideal instances": mixer("model", "ideal"),
        "ideal": None,
    }
    rows = {name: run_oracle(cfg, dataset_name, make_outputs=mixers[name])[0] for name in VARIANTS}
    return rows, confusion_matrix(cache, dataset_name)


def confusion_matrix(cache, dataset_name):
    """``(classes, counts)``: [C, C] pixel counts (ground truth x argmax of the predicted
    ``sem_seg``) over the labelled, non-crowd pixels of the images in ``cache``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from panopticapi.utils import rgb2id
    from PIL import Image

    from deeperlab_d2.evaluation.oracle import semantic_ground_truth

    meta = MetadataCatalog.get(dataset_name)
    C = len(meta.stuff_dataset_id_to_contiguous_id)
    classes = list(getattr(meta, "stuff_classes", [str(i) for i in range(C)]))
    counts = np.zeros((C, C), dtype=np.int64)
    for rec in DatasetCatalog.get(dataset_name):
        if rec["file_name"] not in cache:
            continue
        gt_ids = rgb2id(np.asarray(Image.open(rec["pan_seg_file_name"]).convert("RGB")))
        segments = [s for s in rec["segments_info"] if not s.get("iscrowd", 0)]
        gt = semantic_ground_truth(gt_ids, segments)
        pred = cache[rec["file_name"]]["sem_seg"][0].argmax(0).numpy()
        valid = gt >= 0
        counts += np.bincount(gt[valid] * C + pred[valid], minlength=C * C).reshape(C, C)
    return classes, counts


def main(argv=None):
    from deeperlab_d2.evaluation.oracle import pq_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--dataset", default=None, help="a registered dataset instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    for path in (args.config_file, args.weights):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    rows, (classes, counts) = diagnose(
        args.root, args.split, args.config_file, args.weights, args.opts, args.dataset
    )
    print(pq_table(rows, "outputs"))
    print()
    print("| ground truth \\ predicted (% of pixels) | " + " | ".join(classes) + " |")
    print("|---|" + "---|" * len(classes))
    share = 100.0 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    for name, row in zip(classes, share):
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
