#!/usr/bin/env python
"""Oracle check of DeeperLab's post-processing on the synthetic val split.

Builds the *ideal* head outputs from the ground truth (targets -> logits/offsets), runs the real
post-processing, scores it with panopticapi, and reports PQ on the hard cases separately.

    python benchmarks/oracle_pq.py [--root DIR] [--config CFG] [--split val] [KEY VALUE ...]

Ideal outputs: semantic logits one-hot (x10) of the semantic target, where void pixels get the
first stuff class and crowd pixels their (thing) class, as a perfect model would see them;
heatmap logits +-10 from the disk targets; short/middle/long-range offsets = their targets.

Hard cases are subsets of the ground-truth thing segments; for a subset S, ``PQ_S`` =
sum of IoUs of the matched segments of S / |S| (recall-weighted quality; false positives cannot
be attributed to a subset).
"""

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(
    REPO, "configs", "synthetic", "deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)


def ideal_outputs(targets, num_classes, void_class, sem_seg_gt):
    """Ideal head outputs (batch of one) from DeeperLabTargetGenerator targets.

    ``sem_seg_gt``: [H, W] contiguous class with crowd pixels kept at their class and void = -1.
    """
    sem = torch.where(sem_seg_gt >= 0, sem_seg_gt, torch.full_like(sem_seg_gt, void_class))
    logits = torch.nn.functional.one_hot(sem, num_classes).permute(2, 0, 1).float() * 10.0
    heat = torch.where(targets["heatmap"] > 0, 10.0, -10.0)
    return (
        logits[None],
        heat[None],
        targets["short_offsets"][None],
        targets["mid_offsets"][None],
        targets["long_offsets"][None],
    )


def rgb2id(rgb):
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids):
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def hard_case_tags(gt_ids, segments, thing_names):
    """Tags of each non-crowd thing segment: touching / ring / border / tiny / many."""
    H, W = gt_ids.shape
    things = [s for s in segments if s["isthing"] and not s.get("iscrowd", 0)]
    thing_ids = {s["id"] for s in things}
    is_thing = np.isin(gt_ids, list(thing_ids))
    tags = {}
    for s in things:
        m = gt_ids == s["id"]
        t = set()
        # touching: a 4-neighbour pixel belongs to another thing instance
        for a, b in (
            (m[1:, :], gt_ids[:-1, :]),
            (m[:-1, :], gt_ids[1:, :]),
            (m[:, 1:], gt_ids[:, :-1]),
            (m[:, :-1], gt_ids[:, 1:]),
        ):
            nb = b[a]
            if np.any((nb != s["id"]) & np.isin(nb, list(thing_ids))):
                t.add("touching")
                break
        if thing_names[s["category_id"]] == "ring":
            t.add("ring")
        if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
            t.add("border-cut")
        if m.sum() < 16 * 16:
            t.add("tiny (<16x16 px)")
        if len(things) >= 10:
            t.add("many (>=10 per image)")
        tags[s["id"]] = t
    del is_thing, H, W
    return tags


def match_segments(gt_ids, gt_segments, pred_ids, pred_segments):
    """IoU of each GT thing segment with its matched prediction (same class, IoU > 0.5)."""
    void = gt_ids == 0
    for s in gt_segments:
        if s.get("iscrowd", 0):
            void |= gt_ids == s["id"]
    pred_cat = {s["id"]: s["category_id"] for s in pred_segments}
    ious = {}
    for s in gt_segments:
        if not s["isthing"] or s.get("iscrowd", 0):
            continue
        m = gt_ids == s["id"]
        best = 0.0
        for pid in np.unique(pred_ids[m]):
            if pid == 0 or pred_cat.get(int(pid)) != s["category_id"]:
                continue
            p = (pred_ids == pid) & ~void
            inter = np.sum(m & p)
            iou = inter / (m.sum() + p.sum() - inter)
            best = max(best, iou)
        ious[s["id"]] = best if best > 0.5 else 0.0
    return ious


def run_oracle(root, split="val", config=TINY_CONFIG, verbose=True, make_outputs=None, opts=()):
    """Returns (panopticapi results dict, hard-case table dict).

    ``make_outputs(record, ideal)``, when given, replaces the ideal head outputs of each image
    (a tuple ``(sem_seg, heatmap, short, mid, long)``, batch of one) by its return value; the
    diagnosis script uses it to mix a trained model's outputs with the ideal ones. ``opts`` are
    extra config key/value pairs.
    """
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from panopticapi.evaluation import pq_compute

    from deeperlab_d2 import DeeperLabTargetGenerator, add_deeperlab_config
    from deeperlab_d2.config import post_process_config
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic
    from deeperlab_d2.layers.post_processing import deeperlab_panoptic_inference

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    prefix = "oracle_synthetic"
    register_deeperlab_synthetic(root, prefix=prefix)
    name = f"{prefix}_{split}"
    meta = MetadataCatalog.get(name)
    thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    num_classes = len(meta.stuff_classes)
    void_class = min(set(range(num_classes)) - set(thing_ids))
    gen = DeeperLabTargetGenerator(
        ignore_label=255,
        thing_ids=thing_ids,
        keypoint_radius=cfg.MODEL.DEEPERLAB.TARGETS.KEYPOINT_RADIUS,
    )
    pp = post_process_config(cfg)
    contiguous_to_dataset = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    thing_names = {i: meta.stuff_classes[i] for i in range(num_classes)}

    out_dir = tempfile.mkdtemp(prefix="oracle_pq_")
    pred_annotations = []
    stats = defaultdict(lambda: [0, 0, 0.0])  # tag -> [count, matched, sum IoU]
    for rec in DatasetCatalog.get(name):
        gt_ids = rgb2id(np.asarray(Image.open(rec["pan_seg_file_name"])))
        segs = rec["segments_info"]
        targets = gen(gt_ids, segs)
        sem_gt = np.full(gt_ids.shape, -1, dtype=np.int64)
        for s in segs:
            sem_gt[gt_ids == s["id"]] = s["category_id"]
        outs = ideal_outputs(targets, num_classes, void_class, torch.from_numpy(sem_gt))
        if make_outputs is not None:
            outs = make_outputs(rec, outs)
        (res,) = deeperlab_panoptic_inference(*outs, thing_ids, pp)
        pred = res["panoptic"].numpy()
        file_name = os.path.splitext(os.path.basename(rec["pan_seg_file_name"]))[0] + ".png"
        Image.fromarray(id2rgb(pred)).save(os.path.join(out_dir, file_name))
        pred_annotations.append(
            {
                "image_id": rec["image_id"],
                "file_name": file_name,
                "segments_info": [
                    {"id": s["id"], "category_id": contiguous_to_dataset[s["category_id"]]}
                    for s in res["segments_info"]
                ],
            }
        )
        ious = match_segments(gt_ids, segs, pred, res["segments_info"])
        for sid, tags in hard_case_tags(gt_ids, segs, thing_names).items():
            for tag in tags | {"all things"}:
                st = stats[tag]
                st[0] += 1
                st[1] += ious[sid] > 0
                st[2] += ious[sid]
    with open(meta.panoptic_json) as f:
        gt_json = json.load(f)
    pred_json = os.path.join(out_dir, "predictions.json")
    with open(pred_json, "w") as f:
        json.dump(dict(gt_json, annotations=pred_annotations), f)
    stdout = sys.stdout
    if not verbose:
        sys.stdout = open(os.devnull, "w")
    try:
        pq = pq_compute(meta.panoptic_json, pred_json, meta.panoptic_root, out_dir)
    finally:
        if not verbose:
            sys.stdout.close()
            sys.stdout = stdout
    table = {
        tag: {"count": c, "recall": 100.0 * m / max(c, 1), "PQ": 100.0 * s / max(c, 1)}
        for tag, (c, m, s) in sorted(stats.items())
    }
    return pq, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--config", default=TINY_CONFIG)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    pq, table = run_oracle(args.root, args.split, args.config, verbose=False, opts=args.opts)
    print("| split | PQ | SQ | RQ | PQ things | PQ stuff |")
    print("|---|---|---|---|---|---|")
    a, t, s = pq["All"], pq["Things"], pq["Stuff"]
    print(
        f"| {args.split} | {100 * a['pq']:.2f} | {100 * a['sq']:.2f} | {100 * a['rq']:.2f} "
        f"| {100 * t['pq']:.2f} | {100 * s['pq']:.2f} |"
    )
    print()
    print("| hard case (GT thing segments) | count | matched % | PQ_S |")
    print("|---|---|---|---|")
    for tag, row in table.items():
        print(f"| {tag} | {row['count']} | {row['recall']:.1f} | {row['PQ']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
