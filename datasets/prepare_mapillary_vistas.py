#!/usr/bin/env python
"""Prepare Mapillary Vistas v1.2 (panoptic) for deeperlab_d2.

Usage::

    python datasets/prepare_mapillary_vistas.py [--root DIR] [--workers N] [--overwrite]
                                                [--log-every K]

``root`` defaults to ``$DETECTRON2_DATASETS`` or ``./datasets`` and must contain the official
v1.2 layout::

    mapillary_vistas/
      training/images/<key>.jpg
      training/panoptic/<key>.png               COCO panoptic PNGs, id = R + 256 G + 256^2 B
      training/panoptic/panoptic_2018.json      COCO panoptic json with STRING image ids (<key>)
      validation/...                            the same

For every split that is present it writes::

    mapillary_vistas/<split>/panoptic_semseg/<key>.png

uint8 semantic labels in contiguous ids (contiguous id = index of the category in the json's
``categories`` list), 255 for void (panoptic id 0 or a segment missing from ``segments_info``)
and for crowd segments, and ``mapillary_vistas/categories.json``: the json's category list, so
that the Detectron2 registration does not have to parse the large panoptic json.

The script only needs numpy and Pillow. Existing semantic PNGs are kept unless ``--overwrite``;
each PNG is written to a temporary file first, so an interrupted run leaves no partial output.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

DATASET_DIRNAME = "mapillary_vistas"
SPLITS = ("training", "validation")
PANOPTIC_JSON_NAME = "panoptic_2018.json"
SEMSEG_DIRNAME = "panoptic_semseg"
CATEGORIES_FILENAME = "categories.json"
IGNORE_LABEL = 255
MAX_PANOPTIC_ID = 256**3

# (panoptic PNG, output PNG, segment ids, contiguous label of each segment id)
Task = Tuple[str, str, List[int], List[int]]


def default_root() -> str:
    """The default datasets root.

    Returns:
        str: ``$DETECTRON2_DATASETS`` if set, else ``./datasets``.
    """
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def read_panoptic_ids(path: str) -> np.ndarray:
    """Read a COCO panoptic PNG into segment ids.

    Args:
        path: the RGB panoptic PNG.

    Returns:
        np.ndarray: uint32 array of shape (H, W), ``R + 256 * G + 256**2 * B``.
    """
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_to_semseg(
    pan_ids: np.ndarray, segment_ids: Sequence[int], labels: Sequence[int]
) -> np.ndarray:
    """Map a panoptic id map to contiguous semantic labels.

    Uses a lookup table over all 24-bit ids (16 MB), much faster than a search on full-size
    Vistas images.

    Args:
        pan_ids: (H, W) integer segment ids in ``[0, 256**3)``.
        segment_ids: the ids of the labelled segments.
        labels: the label (0..254, or 255 for a crowd segment) of each entry of ``segment_ids``.

    Returns:
        np.ndarray: uint8 (H, W) labels; pixels whose id is not in ``segment_ids`` (id 0 included)
        are 255.
    """
    lut = np.full(MAX_PANOPTIC_ID, IGNORE_LABEL, dtype=np.uint8)
    ids = np.asarray(segment_ids, dtype=np.int64)
    values = np.asarray(labels, dtype=np.uint8)
    valid = (ids > 0) & (ids < MAX_PANOPTIC_ID)  # other ids cannot occur in an RGB PNG
    lut[ids[valid]] = values[valid]
    return lut[pan_ids]


def _convert_one(task: Task) -> str:
    """Convert one panoptic PNG into a semantic PNG (worker function).

    Args:
        task: (panoptic PNG, output PNG, segment ids, labels).

    Returns:
        str: the output path.
    """
    pan_path, out_path, segment_ids, labels = task
    semseg = panoptic_to_semseg(read_panoptic_ids(pan_path), segment_ids, labels)
    tmp_path = out_path + ".tmp"
    Image.fromarray(semseg).save(tmp_path, format="PNG")
    os.replace(tmp_path, out_path)
    return out_path


def _load_json(path: str) -> dict:
    """Read a panoptic json, with a clear error when it is missing.

    Args:
        path: the json file.

    Returns:
        dict: its content.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Mapillary Vistas panoptic annotations not found: {path}. Download Mapillary Vistas "
            "v1.2 and unzip it so that <split>/panoptic/panoptic_2018.json exists."
        )
    with open(path) as f:
        return json.load(f)


def _split_tasks(
    split_dir: str, pan_json: dict, categories: List[dict], overwrite: bool
) -> Tuple[List[Task], int]:
    """Build the conversion tasks of one split.

    Args:
        split_dir: ``<root>/mapillary_vistas/<split>``.
        pan_json: the split's panoptic json.
        categories: the category list (its order defines the contiguous ids).
        overwrite: also convert images whose output already exists.

    Returns:
        tuple: (tasks, number of images skipped because their output exists).
    """
    contiguous = {cat["id"]: i for i, cat in enumerate(categories)}
    pan_dir = os.path.join(split_dir, "panoptic")
    out_dir = os.path.join(split_dir, SEMSEG_DIRNAME)
    if not os.path.isdir(pan_dir):
        raise FileNotFoundError(f"Mapillary Vistas panoptic PNG folder not found: {pan_dir}")
    available = set(os.listdir(pan_dir))
    existing = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    tasks: List[Task] = []
    skipped = 0
    for ann in pan_json.get("annotations", []):
        png_name = ann["file_name"]
        if png_name not in available:
            raise FileNotFoundError(
                f"Panoptic PNG of image {ann['image_id']!r} not found: "
                f"{os.path.join(pan_dir, png_name)}"
            )
        out_name = os.path.splitext(png_name)[0] + ".png"
        if out_name in existing and not overwrite:
            skipped += 1
            continue
        label_of: Dict[int, int] = {}
        for seg in ann.get("segments_info", []):
            if seg["category_id"] not in contiguous:
                raise ValueError(
                    f"Segment {seg['id']} of image {ann['image_id']!r} has category_id "
                    f"{seg['category_id']}, which is not in the json's categories."
                )
            iscrowd = bool(seg.get("iscrowd", 0))
            label_of[int(seg["id"])] = IGNORE_LABEL if iscrowd else contiguous[seg["category_id"]]
        segment_ids = sorted(label_of)
        tasks.append(
            (
                os.path.join(pan_dir, png_name),
                os.path.join(out_dir, out_name),
                segment_ids,
                [label_of[s] for s in segment_ids],
            )
        )
    return tasks, skipped


def _run_tasks(tasks: List[Task], workers: int, log_every: int, name: str, verbose: bool) -> None:
    """Run conversion tasks, printing a progress line every ``log_every`` images.

    Args:
        tasks: the conversion tasks.
        workers: number of worker processes (<= 1: run in this process).
        log_every: print progress every this many images (<= 0: only at the end).
        name: split name used in the progress lines.
        verbose: print progress at all.
    """
    start = time.time()
    total = len(tasks)

    def report(done: int) -> None:
        if not verbose:
            return
        if done == total or (log_every > 0 and done % log_every == 0):
            elapsed = time.time() - start
            rate = done / elapsed if elapsed > 0 else float("inf")
            print(f"[{name}] {done}/{total} images converted ({rate:.1f} img/s)", flush=True)

    if total == 0:
        return
    if workers <= 1 or total == 1:
        for done, task in enumerate(tasks, 1):
            _convert_one(task)
            report(done)
        return
    chunksize = max(1, min(16, total // (workers * 8)))
    with multiprocessing.Pool(processes=min(workers, total)) as pool:
        for done, _ in enumerate(pool.imap_unordered(_convert_one, tasks, chunksize), 1):
            report(done)


def _write_categories(path: str, categories: List[dict], verbose: bool) -> None:
    """Write ``categories.json`` atomically, warning when it changes an existing one.

    Args:
        path: the output file.
        categories: the category list.
        verbose: print a line about the written file.
    """
    if os.path.isfile(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous != categories:
            print(
                f"warning: {path} had different categories; semantic PNGs written before may "
                "use other contiguous ids, rerun with --overwrite.",
                file=sys.stderr,
            )
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(categories, f, indent=1)
    os.replace(tmp_path, path)
    if verbose:
        print(f"wrote {path} ({len(categories)} categories)", flush=True)


def prepare_mapillary_vistas(
    root: str,
    workers: int = 2,
    overwrite: bool = False,
    log_every: int = 500,
    verbose: bool = True,
) -> Dict[str, Dict[str, int]]:
    """Write the semantic PNGs and ``categories.json`` of every split present under ``root``.

    Args:
        root: datasets root, the folder that contains ``mapillary_vistas``.
        workers: number of worker processes.
        overwrite: also convert images whose semantic PNG already exists.
        log_every: print a progress line every this many images.
        verbose: print progress.

    Returns:
        dict: for each processed split, ``{"converted": n, "skipped": m}``.

    Raises:
        FileNotFoundError: if the dataset folder, every split, a split's panoptic json or a
            panoptic PNG is missing.
        ValueError: if the splits disagree on the categories or a segment has an unknown
            category.
    """
    base = os.path.join(os.path.expanduser(root), DATASET_DIRNAME)
    if not os.path.isdir(base):
        raise FileNotFoundError(
            f"Mapillary Vistas folder not found: {base}. Download Mapillary Vistas v1.2 and unzip "
            f"it there (or pass --root / set $DETECTRON2_DATASETS to the folder that contains "
            f"{DATASET_DIRNAME}/)."
        )
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(base, s))]
    if not splits:
        expected = " or ".join(os.path.join(base, s) for s in SPLITS)
        raise FileNotFoundError(f"No Mapillary Vistas split found: expected {expected}.")

    categories: Optional[List[dict]] = None
    stats: Dict[str, Dict[str, int]] = {}
    for split in splits:
        split_dir = os.path.join(base, split)
        json_path = os.path.join(split_dir, "panoptic", PANOPTIC_JSON_NAME)
        if verbose:
            print(f"[{split}] reading {json_path}", flush=True)
        pan_json = _load_json(json_path)
        split_categories = pan_json.get("categories")
        if not split_categories:
            raise ValueError(f"{json_path} has no categories.")
        if len(split_categories) >= IGNORE_LABEL:
            raise ValueError(
                f"{json_path} has {len(split_categories)} categories; uint8 semantic labels with "
                f"{IGNORE_LABEL} as ignore allow at most {IGNORE_LABEL - 1}."
            )
        if categories is None:
            categories = split_categories
            _write_categories(os.path.join(base, CATEGORIES_FILENAME), categories, verbose)
        elif split_categories != categories:
            raise ValueError(
                f"The categories of {json_path} differ from those of the {splits[0]} split."
            )
        tasks, skipped = _split_tasks(split_dir, pan_json, categories, overwrite)
        del pan_json
        os.makedirs(os.path.join(split_dir, SEMSEG_DIRNAME), exist_ok=True)
        if verbose:
            print(
                f"[{split}] {len(tasks)} images to convert, {skipped} skipped (output exists)",
                flush=True,
            )
        _run_tasks(tasks, workers, log_every, split, verbose)
        stats[split] = {"converted": len(tasks), "skipped": skipped}
    return stats


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        argparse.Namespace: ``root``, ``workers``, ``overwrite``, ``log_every``, ``quiet``.
    """
    parser = argparse.ArgumentParser(
        description="Write contiguous-id semantic PNGs and categories.json for Mapillary Vistas "
        "v1.2 panoptic."
    )
    parser.add_argument(
        "--root",
        default=default_root(),
        help="datasets root that contains mapillary_vistas/ (default: $DETECTRON2_DATASETS or "
        "./datasets)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument(
        "--overwrite", action="store_true", help="rewrite semantic PNGs that already exist"
    )
    parser.add_argument(
        "--log-every", type=int, default=500, help="progress line every N images (default: 500)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        int: 0 on success, 1 on a missing file or invalid annotation (message on stderr).
    """
    args = parse_args(argv)
    try:
        stats = prepare_mapillary_vistas(
            args.root,
            workers=args.workers,
            overwrite=args.overwrite,
            log_every=args.log_every,
            verbose=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"prepare_mapillary_vistas.py: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        summary = ", ".join(
            f"{split}: {s['converted']} converted, {s['skipped']} skipped"
            for split, s in stats.items()
        )
        print(f"done ({summary})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
