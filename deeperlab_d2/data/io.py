"""Reading dataset files with errors that name the file (shared by loaders, mapper and checks)."""

import json
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

__all__ = [
    "AnnotationMismatchError",
    "DatasetFileError",
    "panoptic_id_mismatch",
    "read_image_or_raise",
    "read_json_or_raise",
]


class DatasetFileError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class AnnotationMismatchError(DatasetFileError):
    """A panoptic PNG contains none of the segments its ``segments_info`` lists (wrong id
    encoding, a palette PNG, an off-by-one, the wrong PNG): the whole image would be void."""


def read_image_or_raise(file_name: str, fmt: Optional[str], what: str = "image") -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` with an error that names the file.

    Raises:
        DatasetFileError: if the file is missing or cannot be decoded.
    """
    from detectron2.data import detection_utils as utils

    try:
        return utils.read_image(file_name, format=fmt)
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these on bad files
        raise DatasetFileError(f"cannot read {what} {file_name!r}: {e}") from e


def read_json_or_raise(file_name: str, what: str = "json file"):
    """``json.load`` of a file, with an error that names the file (and where it stops parsing).

    Raises:
        DatasetFileError: if the file is missing, unreadable or not valid JSON.
    """
    try:
        with open(file_name) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFileError(
            f"{what} {file_name!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFileError(f"cannot read {what} {file_name!r}: {e}") from e


def panoptic_id_mismatch(
    panoptic: np.ndarray, segments_info: Iterable[dict]
) -> Tuple[List[int], List[int], Set[int]]:
    """Compare the ids present in a panoptic id map with the ids its ``segments_info`` lists.

    Args:
        panoptic: [H, W] integer ids (``rgb2id`` of the PNG; 0 = void).
        segments_info: the record's segments (each with an ``id``).

    Returns:
        (listed ids absent from the map, non-zero ids of the map that are not listed, the set of
        ids present in the map). Both lists are sorted.
    """
    present = set(np.unique(panoptic).tolist())
    present.discard(0)
    listed = [int(s["id"]) for s in segments_info]
    missing = sorted(set(listed) - present)
    unlisted = sorted(present - set(listed))
    return missing, unlisted, present


def describe_ids(ids: List[int], limit: int = 8) -> str:
    """``[1, 2, 3] (+5 more)``: a short list of ids for a message."""
    shown = ", ".join(str(i) for i in ids[:limit])
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return f"[{shown}]{more}"


def convert_segment_category(segment: dict, meta: Dict[str, Dict[int, int]], where: str) -> dict:
    """A copy of a COCO-panoptic segment with a contiguous ``category_id`` and ``isthing``.

    Args:
        segment: the json's segment (dataset ``category_id``).
        meta: ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``
            (the latter may list every category, things included, as Detectron2's COCO does).
        where: what to name in an error (file, image id).

    Raises:
        DatasetFileError: if the category is unknown or the segment has no id / category_id.
    """
    for key in ("id", "category_id"):
        if key not in segment:
            raise DatasetFileError(f"{where}: a segment has no {key!r}: {segment}")
    segment = dict(segment)
    cat = segment["category_id"]
    things = meta["thing_dataset_id_to_contiguous_id"]
    stuff = meta.get("stuff_dataset_id_to_contiguous_id", {})
    if cat in things:
        segment["category_id"], segment["isthing"] = things[cat], True
    elif cat in stuff:
        segment["category_id"], segment["isthing"] = stuff[cat], False
    else:
        known = sorted(set(things) | set(stuff))
        raise DatasetFileError(
            f"{where}: segment {segment['id']} has unknown category_id {cat!r} (the dataset's "
            f"metadata knows {describe_ids(known)})"
        )
    return segment
