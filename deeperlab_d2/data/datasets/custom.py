"""Registration of COCO-panoptic-format data: your own dataset in one call, and COCO 2017 panoptic
with the semantic PNGs of ``datasets/prepare_coco_semantic_from_panoptic.py``.

Contiguous ids (the model's classes, the values of the semantic PNGs): the thing categories in the
order of the json's ``categories`` list, then the stuff categories in that order. Things first
keeps Detectron2's COCOEvaluator happy (it wants the thing ids to be ``0..T-1``); for COCO this
is the order of Detectron2's builtin ``coco_2017_*_panoptic`` (whose json lists things first).
"""

import json
import os
from typing import Dict, List, Optional

from .coco_panoptic import load_panoptic_json
from .registration import register_panoptic_split

__all__ = [
    "COCO_SEM_SEG_SPLITS",
    "contiguous_id_map",
    "get_panoptic_metadata",
    "register_coco_panoptic_dataset",
    "register_coco_panoptic_with_sem_seg",
]

#: name -> (image folder, panoptic folder, panoptic json, semantic folder, instances json),
#: relative to the datasets root (the layout of detectron2's builtin ``coco_2017_*_panoptic``)
COCO_SEM_SEG_SPLITS = {
    f"coco_2017_{split}_panoptic_with_sem_seg": (
        f"coco/{split}2017",
        f"coco/panoptic_{split}2017",
        f"coco/annotations/panoptic_{split}2017.json",
        f"coco/panoptic_semseg_{split}2017",
        f"coco/annotations/instances_{split}2017.json",
    )
    for split in ("train", "val")
}

SEM_SEG_HINT = "python datasets/prepare_coco_semantic_from_panoptic.py"


def contiguous_id_map(categories: List[dict]) -> Dict[int, int]:
    """Dataset category id -> contiguous id: things first, then stuff, each in list order."""
    ordered = [c for c in categories if c["isthing"]] + [c for c in categories if not c["isthing"]]
    return {int(c["id"]): i for i, c in enumerate(ordered)}


def _color(category: dict, index: int) -> List[int]:
    if "color" in category:
        return [int(v) for v in category["color"]]
    return [(index * 67 + 40) % 256, (index * 151 + 90) % 256, (index * 29 + 160) % 256]


def get_panoptic_metadata(categories: List[dict]) -> Dict[str, object]:
    """Category metadata of Detectron2's ``register_coco_panoptic`` convention.

    Args:
        categories: a COCO-panoptic ``categories`` list (``id``, ``name``, ``isthing``, optional
            ``color``).

    Returns:
        dict: ``thing_classes`` / ``thing_colors`` (things), ``stuff_classes`` / ``stuff_colors``
        (ALL categories, in contiguous order), ``thing_dataset_id_to_contiguous_id`` (things
        only) and ``stuff_dataset_id_to_contiguous_id`` (all categories -> ``0..C-1``).
    """
    ids = contiguous_id_map(categories)
    ordered = sorted(categories, key=lambda c: ids[int(c["id"])])
    things = [c for c in ordered if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [_color(c, ids[int(c["id"])]) for c in things],
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": [_color(c, ids[int(c["id"])]) for c in ordered],
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): ids[int(c["id"])] for c in things},
        "stuff_dataset_id_to_contiguous_id": ids,
    }


def _attach_sem_seg(records: List[dict], sem_seg_root: str) -> List[dict]:
    if not os.path.isdir(sem_seg_root):
        raise FileNotFoundError(
            f"semantic label folder {sem_seg_root!r} does not exist; write it with `{SEM_SEG_HINT} "
            f"--panoptic-json <json> --panoptic-root <folder> --output {sem_seg_root}` (COCO: "
            f"`{SEM_SEG_HINT} --root <datasets root>`)"
        )
    for record in records:
        record["sem_seg_file_name"] = os.path.join(
            sem_seg_root, os.path.basename(record["pan_seg_file_name"])
        )
    return records


def register_coco_panoptic_dataset(
    name: str,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str] = None,
    instances_json: Optional[str] = None,
    categories: Optional[List[dict]] = None,
) -> None:
    """Register a COCO-panoptic-format dataset split as ``name`` (replacing an existing one).

    Args:
        name: the dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        image_root: folder of the images (``images[].file_name`` of the json, else
            ``<annotation stem>.jpg``).
        panoptic_root: folder of the panoptic PNGs (id = R + 256 G + 256^2 B, 0 = void).
        panoptic_json: the COCO panoptic json (``images``, ``annotations``, ``categories``).
        sem_seg_root: optional folder of semantic PNGs (same names as the panoptic PNGs,
            contiguous ids, 255 = void and crowd) written by
            ``datasets/prepare_coco_semantic_from_panoptic.py``; adds ``sem_seg_file_name`` to the
            records and so mIoU (SemSegEvaluator) to the evaluation.
        instances_json: optional COCO instances json of the things: adds box / mask AP.
        categories: the category list; read from ``panoptic_json`` now when not given.

    The records are loaded lazily (on ``DatasetCatalog.get(name)``); the metadata is that of
    :func:`get_panoptic_metadata` plus the paths and ``evaluator_type="coco_panoptic_seg"``.
    """
    if categories is None:
        if not os.path.isfile(panoptic_json):
            raise FileNotFoundError(f"panoptic annotations {panoptic_json!r} do not exist")
        with open(panoptic_json) as f:
            categories = json.load(f)["categories"]
    meta = get_panoptic_metadata(categories)

    def load() -> List[dict]:
        records = load_panoptic_json(panoptic_json, image_root, panoptic_root, meta)
        return _attach_sem_seg(records, sem_seg_root) if sem_seg_root else records

    paths = {"image_root": image_root, "panoptic_root": panoptic_root}
    paths["panoptic_json"] = panoptic_json
    if sem_seg_root:
        paths["sem_seg_root"] = sem_seg_root
    if instances_json:
        paths["json_file"] = instances_json
    register_panoptic_split(name, load, {**meta, **paths})


def register_coco_panoptic_with_sem_seg(root: str) -> List[str]:
    """Register ``coco_2017_{train,val}_panoptic_with_sem_seg`` under ``root``: detectron2's
    ``coco_2017_*_panoptic`` (same metadata and contiguous ids) plus ``sem_seg_file_name`` in
    ``coco/panoptic_semseg_{train,val}2017`` (``datasets/prepare_coco_semantic_from_panoptic.py``),
    as later detectron2 versions do. Lazy: nothing is read before ``DatasetCatalog.get``."""
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
    from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

    meta = _get_builtin_metadata("coco_panoptic_standard")
    names = []
    for name, relative in COCO_SEM_SEG_SPLITS.items():
        image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json = (
            os.path.join(root, p) for p in relative
        )

        def load(args=(panoptic_json, image_root, panoptic_root, sem_seg_root)) -> List[dict]:
            json_file, images, panoptic, sem_seg = args
            if not os.path.isfile(json_file):
                raise FileNotFoundError(
                    f"COCO panoptic annotations {json_file!r} do not exist (see datasets/README.md)"
                )
            return _attach_sem_seg(
                load_coco_panoptic_json(json_file, images, panoptic, meta), sem_seg
            )

        register_panoptic_split(
            name,
            load,
            {
                **meta,
                "image_root": image_root,
                "panoptic_root": panoptic_root,
                "panoptic_json": panoptic_json,
                "sem_seg_root": sem_seg_root,
                "json_file": instances_json,
            },
        )
        names.append(name)
    return names
