"""A COCO-panoptic json loader whose errors name the file, the image and the segment.

It returns the records of Detectron2's ``load_coco_panoptic_json`` (same keys, contiguous
``category_id`` and ``isthing`` per segment) plus ``height`` / ``width`` when the json's
``images`` give them, and takes the image file name from ``images[].file_name`` when present
(Detectron2 always assumes ``<annotation stem>.jpg``).
"""

import os
from typing import List

from ..io import DatasetFileError, convert_segment_category, read_json_or_raise

__all__ = ["load_panoptic_json"]


def load_panoptic_json(json_file: str, image_dir: str, panoptic_dir: str, meta: dict) -> List[dict]:
    """Load a COCO-panoptic json as Detectron2 dataset dicts.

    Args:
        json_file: the panoptic json (``images``, ``annotations`` with ``segments_info``).
        image_dir: folder of the images.
        panoptic_dir: folder of the panoptic PNGs.
        meta: ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``.

    Returns:
        list[dict]: ``file_name``, ``image_id``, ``pan_seg_file_name``, ``segments_info``, and
        ``height`` / ``width`` if known.

    Raises:
        DatasetFileError: if the json is missing or invalid, an annotation lacks a key, a
            segment has an unknown category, or the image / PNG folder does not exist; the
            message names the json and, where it applies, the image and segment.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"panoptic annotations {json_file!r} do not exist")
    data = read_json_or_raise(json_file, "panoptic annotations")
    if not isinstance(data, dict) or "annotations" not in data:
        raise DatasetFileError(f"panoptic annotations {json_file!r} have no 'annotations' list")
    images = {img.get("id"): img for img in data.get("images", []) if isinstance(img, dict)}
    records = []
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise DatasetFileError(f"{json_file}: annotation #{i} has no {key!r}")
        image_id = ann["image_id"]
        where = f"{json_file}: image {image_id!r} ({ann['file_name']})"
        segments = [convert_segment_category(s, meta, where) for s in ann["segments_info"]]
        image = images.get(image_id, {})
        image_name = image.get("file_name") or os.path.splitext(ann["file_name"])[0] + ".jpg"
        record = {
            "file_name": os.path.join(image_dir, os.path.basename(image_name)),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_dir, ann["file_name"]),
            "segments_info": segments,
        }
        if "height" in image and "width" in image:
            record["height"], record["width"] = int(image["height"]), int(image["width"])
        records.append(record)
    if not records:
        raise DatasetFileError(f"panoptic annotations {json_file!r} list no image")
    for folder, what in ((image_dir, "image"), (panoptic_dir, "panoptic PNG")):
        if not os.path.isdir(folder):  # a wrong root; single missing files are the mapper's
            raise DatasetFileError(f"{what} folder {folder!r} of {json_file!r} does not exist")
    return records
