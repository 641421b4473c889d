#!/usr/bin/env python
"""Write semantic label PNGs from COCO-panoptic PNGs + json (for SemSegEvaluator / mIoU).

COCO 2017 (the default): for each split present under ``<root>/coco``

    coco/annotations/panoptic_{train,val}2017.json + coco/panoptic_{train,val}2017/*.png
    -> coco/panoptic_semseg_{train,val}2017/*.png

with the contiguous ids of detectron2's builtin ``coco_2017_*_panoptic`` (0..132: the 80 things,
then the 53 stuff classes, in id order), read by deeperlab_d2's
``coco_2017_{train,val}_panoptic_with_sem_seg``.

Your own data (``--panoptic-json``): one json + PNG folder -> ``--output``, with the contiguous
ids of ``deeperlab_d2.data.datasets.register_coco_panoptic_dataset`` (the json's thing
categories in list order, then its stuff categories in list order).

Each output PNG is uint8 (mode "L"), named like its panoptic PNG; 255 = void (id 0 or a segment
missing from ``segments_info``) AND crowd segments. Needs numpy and Pillow (detectron2 only for
COCO's builtin id map).

    python datasets/prepare_coco_semantic_from_panoptic.py                  # $DETECTRON2_DATASETS
    python datasets/prepare_coco_semantic_from_panoptic.py --root /data --workers 8
    python datasets/prepare_coco_semantic_from_panoptic.py --panoptic-json my/panoptic_train.json \\
        --panoptic-root my/panoptic_train --output my/panoptic_semseg_train
"""

import argparse
import json
import os
import sys
from functools import partial
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
COCO_SPLITS = ("train", "val")


def contiguous_id_map(categories: List[dict]) -> Dict[int, int]:
    """Things first, then stuff, each in list order (the same as
    ``deeperlab_d2.data.datasets.contiguous_id_map``)."""
    ordered = [c for c in categories if c["isthing"]] + [c for c in categories if not c["isthing"]]
    return {int(c["id"]): i for i, c in enumerate(ordered)}


def coco_builtin_id_map(categories: List[dict]) -> Dict[int, int]:
    """detectron2's contiguous ids of ``coco_2017_*_panoptic`` (each json category must have
    one)."""
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    meta = _get_builtin_metadata("coco_panoptic_standard")
    # detectron2 0.6 splits them: things in the thing map, stuff in the stuff map
    id_map = {
        **meta["stuff_dataset_id_to_contiguous_id"],
        **meta["thing_dataset_id_to_contiguous_id"],
    }
    unknown = [c["id"] for c in categories if c["id"] not in id_map]
    if unknown:
        raise ValueError(f"categories {unknown} are not COCO panoptic categories of detectron2")
    return id_map


def panoptic_to_semantic(
    panoptic_rgb: np.ndarray, segments_info: List[dict], id_map: Dict[int, int]
) -> np.ndarray:
    """Semantic labels (H, W) uint8 of one COCO panoptic PNG (H, W, 3)."""
    rgb = panoptic_rgb.astype(np.int64)
    pan = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    labels = np.full(pan.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        if not seg.get("iscrowd", 0):
            labels[pan == seg["id"]] = id_map[seg["category_id"]]
    return labels


def _convert_one(job, id_map: Dict[int, int]) -> str:
    src, dst, segments_info = job
    if not os.path.isfile(src):
        raise FileNotFoundError(f"panoptic PNG {src} does not exist")
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB"))
    Image.fromarray(panoptic_to_semantic(rgb, segments_info, id_map), mode="L").save(dst)
    return dst


def convert(
    panoptic_json: str,
    panoptic_root: str,
    output: str,
    id_map: Optional[Dict[int, int]] = None,
    workers: int = 1,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, int]:
    """Write the semantic PNG of every annotation of ``panoptic_json`` into ``output``.

    Args:
        id_map: dataset category id -> contiguous id; default :func:`contiguous_id_map` of the
            json's categories.
        workers: processes (1: no multiprocessing).
        overwrite: rewrite existing PNGs (default: keep them).

    Returns:
        dict: ``converted`` and ``skipped`` counts.
    """
    if not os.path.isfile(panoptic_json):
        raise FileNotFoundError(f"panoptic json {panoptic_json} does not exist")
    if not os.path.isdir(panoptic_root):
        raise FileNotFoundError(f"panoptic PNG folder {panoptic_root} does not exist")
    with open(panoptic_json) as f:
        data = json.load(f)
    if id_map is None:
        id_map = contiguous_id_map(data["categories"])
    if max(id_map.values(), default=0) >= IGNORE_LABEL:
        raise ValueError(f"at most {IGNORE_LABEL} categories fit in uint8 labels with 255 = void")
    os.makedirs(output, exist_ok=True)
    jobs, skipped = [], 0
    for ann in data["annotations"]:
        dst = os.path.join(output, ann["file_name"])
        if os.path.exists(dst) and not overwrite:
            skipped += 1
            continue
        jobs.append((os.path.join(panoptic_root, ann["file_name"]), dst, ann["segments_info"]))
    work = partial(_convert_one, id_map=id_map)
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(work, jobs, chunksize=16):
                pass
    else:
        for job in jobs:
            work(job)
    if verbose:
        print(f"{output}: {len(jobs)} semantic PNGs written, {skipped} kept", flush=True)
    return {"converted": len(jobs), "skipped": skipped}


def prepare_coco(
    root: str,
    splits: Sequence[str] = COCO_SPLITS,
    workers: int = 1,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Dict[str, int]]:
    """Convert each COCO 2017 split present under ``<root>/coco`` (a split whose json is absent
    is skipped); raises FileNotFoundError if none is present."""
    coco = os.path.join(root, "coco")
    stats = {}
    for split in splits:
        pan_json = os.path.join(coco, "annotations", f"panoptic_{split}2017.json")
        if not os.path.isfile(pan_json):
            continue
        with open(pan_json) as f:
            id_map = coco_builtin_id_map(json.load(f)["categories"])
        stats[split] = convert(
            pan_json,
            os.path.join(coco, f"panoptic_{split}2017"),
            os.path.join(coco, f"panoptic_semseg_{split}2017"),
            id_map=id_map,
            workers=workers,
            overwrite=overwrite,
            verbose=verbose,
        )
    if not stats:
        raise FileNotFoundError(
            f"no {os.path.join(coco, 'annotations', 'panoptic_{train,val}2017.json')}: download "
            "and unzip the COCO panoptic annotations first (see datasets/README.md)"
        )
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--panoptic-json", help="your own data: the COCO panoptic json")
    parser.add_argument("--panoptic-root", help="your own data: the folder of panoptic PNGs")
    parser.add_argument("--output", help="your own data: the folder of semantic PNGs to write")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    custom = (args.panoptic_json, args.panoptic_root, args.output)
    try:
        if any(custom):
            if not all(custom):
                parser.error("--panoptic-json, --panoptic-root and --output go together")
            convert(*custom, workers=args.workers, overwrite=args.overwrite)
        else:
            prepare_coco(args.root, workers=args.workers, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
