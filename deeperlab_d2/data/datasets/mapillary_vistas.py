"""Detectron2 registration of Mapillary Vistas v1.2 panoptic.

Expected layout under ``root`` (usually ``$DETECTRON2_DATASETS``)::

    mapillary_vistas/
      categories.json                       written by datasets/prepare_mapillary_vistas.py
      training/images/<key>.jpg
      training/panoptic/<key>.png           COCO panoptic PNGs
      training/panoptic/panoptic_2018.json  COCO panoptic json, image ids are STRING keys
      training/panoptic_semseg/<key>.png    written by datasets/prepare_mapillary_vistas.py
      validation/...                        the same

detectron2 0.6's ``load_coco_panoptic_json`` cannot read this json (it calls
``int(image_id)``), hence the loader below. Registration is lazy and cheap: it reads only the
small ``categories.json`` (when it exists) and never raises; loading a split whose files are
missing raises a :class:`FileNotFoundError` that says what to do.
"""

import json
import logging
import os
from typing import Dict, List, Optional

from ..io import read_json_or_raise
from .registration import register_panoptic_split

__all__ = [
    "MAPILLARY_VISTAS_SPLITS",
    "get_mapillary_vistas_metadata",
    "load_mapillary_vistas_panoptic",
    "mapillary_vistas_split_paths",
    "read_mapillary_vistas_categories",
    "register_mapillary_vistas_panoptic",
]

logger = logging.getLogger(__name__)

DATASET_DIRNAME = "mapillary_vistas"
CATEGORIES_FILENAME = "categories.json"
PANOPTIC_JSON_NAME = "panoptic_2018.json"
PREPARE_HINT = "python datasets/prepare_mapillary_vistas.py"
# registered split name -> folder of the official layout
MAPILLARY_VISTAS_SPLITS: Dict[str, str] = {"train": "training", "val": "validation"}


def categories_file(root: str) -> str:
    """Path of the ``categories.json`` written by the prepare script.

    Args:
        root: datasets root (the folder that contains ``mapillary_vistas``).

    Returns:
        str: ``<root>/mapillary_vistas/categories.json``.
    """
    return os.path.join(os.path.expanduser(root), DATASET_DIRNAME, CATEGORIES_FILENAME)


def mapillary_vistas_split_paths(root: str, split: str) -> Dict[str, str]:
    """Paths of one split.

    Args:
        root: datasets root (the folder that contains ``mapillary_vistas``).
        split: ``"train"`` or ``"val"``.

    Returns:
        dict: ``image_root``, ``panoptic_root``, ``panoptic_json`` and ``sem_seg_root``.
    """
    split_dir = os.path.join(
        os.path.expanduser(root), DATASET_DIRNAME, MAPILLARY_VISTAS_SPLITS[split]
    )
    return {
        "image_root": os.path.join(split_dir, "images"),
        "panoptic_root": os.path.join(split_dir, "panoptic"),
        "panoptic_json": os.path.join(split_dir, "panoptic", PANOPTIC_JSON_NAME),
        "sem_seg_root": os.path.join(split_dir, "panoptic_semseg"),
    }


def read_mapillary_vistas_categories(root: str) -> List[dict]:
    """Read the category list written by the prepare script.

    Args:
        root: datasets root (the folder that contains ``mapillary_vistas``).

    Returns:
        list[dict]: the categories of the panoptic json, in contiguous order.

    Raises:
        FileNotFoundError: if ``categories.json`` does not exist.
        ValueError: if it is not a non-empty list of categories.
    """
    path = categories_file(root)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Mapillary Vistas categories not found: {path}. Prepare the dataset first with "
            f"`{PREPARE_HINT} --root <datasets root>` (the root is $DETECTRON2_DATASETS, default "
            "./datasets)."
        )
    with open(path) as f:
        try:
            categories = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rerun `{PREPARE_HINT}`.") from e
    if isinstance(categories, dict):
        categories = categories.get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(
            f"{path} does not hold a non-empty list of categories; rerun `{PREPARE_HINT}`."
        )
    return categories


def get_mapillary_vistas_metadata(categories: List[dict]) -> Dict[str, object]:
    """Category metadata, following detectron2's ``register_coco_panoptic`` convention.

    Args:
        categories: the panoptic json's categories (``id``, ``name``, ``isthing``, ``color``);
            the contiguous id of a category is its index in this list.

    Returns:
        dict: ``thing_classes``, ``thing_colors``, ``stuff_classes`` and ``stuff_colors`` (the
        latter two list ALL categories in contiguous order),
        ``thing_dataset_id_to_contiguous_id`` (things only) and
        ``stuff_dataset_id_to_contiguous_id`` (all categories -> ``0..C-1``).
    """
    thing_map = {c["id"]: i for i, c in enumerate(categories) if c["isthing"]}
    stuff_map = {c["id"]: i for i, c in enumerate(categories)}
    things = [c for c in categories if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [list(c["color"]) for c in things],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": thing_map,
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


def _require_dir(path: str, what: str, hint: str) -> None:
    """Raise a FileNotFoundError naming ``path`` if it is not a folder.

    Args:
        path: the folder.
        what: what the folder holds, for the message.
        hint: what to do about it.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Mapillary Vistas {what} folder not found: {path}. {hint}")


def load_mapillary_vistas_panoptic(
    json_file: str, image_dir: str, panoptic_dir: str, semseg_dir: str, meta: dict
) -> List[dict]:
    """Load one split of Mapillary Vistas v1.2 panoptic as Detectron2 dataset dicts.

    Args:
        json_file: the split's ``panoptic_2018.json``.
        image_dir: folder of the ``.jpg`` images.
        panoptic_dir: folder of the panoptic PNGs.
        semseg_dir: folder of the contiguous-id semantic PNGs written by the prepare script.
        meta: must contain ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``.

    Returns:
        list[dict]: one record per annotated image with ``file_name``, ``image_id`` (the string
        key), ``height``, ``width``, ``pan_seg_file_name``, ``sem_seg_file_name`` and
        ``segments_info``: the json's segments (``id``, ``area``, ``bbox``, ``iscrowd``, ...)
        with a contiguous ``category_id`` and ``isthing``.

    Raises:
        FileNotFoundError: if the json, a folder, an image, a panoptic PNG or a semantic PNG is
            missing; the message names the path.
        ValueError: if an annotation refers to an unknown image or category.
    """
    download_hint = "Download Mapillary Vistas v1.2 and unzip it in the official layout."
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Mapillary Vistas panoptic annotations not found: {json_file}. {download_hint} "
            f"Then run `{PREPARE_HINT} --root <datasets root>`."
        )
    _require_dir(image_dir, "image", download_hint)
    _require_dir(panoptic_dir, "panoptic PNG", download_hint)
    _require_dir(
        semseg_dir,
        "semantic label",
        f"Generate the semantic labels first with `{PREPARE_HINT} --root <datasets root>`.",
    )
    pan_json = read_json_or_raise(json_file, "Mapillary Vistas panoptic annotations")

    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    images = {str(img["id"]): img for img in pan_json.get("images", [])}
    listings = {d: set(os.listdir(d)) for d in (image_dir, panoptic_dir, semseg_dir)}

    def check(folder: str, name: str, what: str, hint: str) -> str:
        if name not in listings[folder]:
            raise FileNotFoundError(
                f"Mapillary Vistas {what} not found: {os.path.join(folder, name)}. {hint}"
            )
        return os.path.join(folder, name)

    records = []
    for ann in pan_json.get("annotations", []):
        image_id = str(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{json_file}: annotation of unknown image {image_id!r}.")
        image = images[image_id]
        stem = os.path.splitext(ann["file_name"])[0]
        image_name = os.path.basename(image.get("file_name") or stem + ".jpg")
        segments_info = []
        for seg in ann.get("segments_info", []):
            seg = dict(seg)
            cat = seg["category_id"]
            if cat in thing_map:
                seg["category_id"], seg["isthing"] = thing_map[cat], True
            elif cat in stuff_map:
                seg["category_id"], seg["isthing"] = stuff_map[cat], False
            else:
                raise ValueError(
                    f"{json_file}: segment {seg.get('id')} of image {image_id!r} has unknown "
                    f"category_id {cat}."
                )
            segments_info.append(seg)
        records.append(
            {
                "file_name": check(image_dir, image_name, "image", download_hint),
                "image_id": image_id,
                "height": image["height"],
                "width": image["width"],
                "pan_seg_file_name": check(
                    panoptic_dir, ann["file_name"], "panoptic PNG", download_hint
                ),
                "sem_seg_file_name": check(
                    semseg_dir,
                    stem + ".png",
                    "semantic label",
                    f"Generate it with `{PREPARE_HINT} --root <datasets root>`.",
                ),
                "segments_info": segments_info,
            }
        )
    logger.info("Loaded %d images of Mapillary Vistas panoptic from %s", len(records), json_file)
    return records


def _load_split(name: str, root: str, paths: Dict[str, str]) -> List[dict]:
    """Load a registered split, reading the categories at load time.

    If the categories were not available at registration, they are added to the dataset's
    metadata now.

    Args:
        name: the registered dataset name.
        root: datasets root.
        paths: the split's paths.

    Returns:
        list[dict]: the dataset records.
    """
    from detectron2.data import MetadataCatalog

    meta = get_mapillary_vistas_metadata(read_mapillary_vistas_categories(root))
    metadata = MetadataCatalog.get(name)
    if not hasattr(metadata, "stuff_classes"):
        metadata.set(**meta)
    return load_mapillary_vistas_panoptic(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        paths["sem_seg_root"],
        meta,
    )


def register_mapillary_vistas_panoptic(
    root: str, prefix: str = "mapillary_vistas_panoptic"
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` in Detectron2's catalogs.

    Registration is lazy: only ``categories.json`` is read, if it exists (its categories go in
    the metadata); the annotations are read by ``DatasetCatalog.get``. Names that are already
    registered are replaced (so that the root can be changed). Never raises because of missing
    or broken data files.

    Args:
        root: datasets root (the folder that contains ``mapillary_vistas``).
        prefix: dataset name prefix; tests use a unique one.

    Returns:
        list[str]: the registered dataset names.
    """

    category_meta: Optional[Dict[str, object]] = None
    if os.path.isfile(categories_file(root)):
        try:
            category_meta = get_mapillary_vistas_metadata(read_mapillary_vistas_categories(root))
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning(
                "Could not read %s (%s); Mapillary Vistas is registered without categories.",
                categories_file(root),
                e,
            )
    names = []
    for split in MAPILLARY_VISTAS_SPLITS:
        name = f"{prefix}_{split}"
        paths = mapillary_vistas_split_paths(root, split)

        def _load(name=name, paths=paths):
            return _load_split(name, root, paths)

        register_panoptic_split(name, _load, {**paths, **(category_meta or {})})
        names.append(name)
    return names
