"""Semantic-segmentation targets shared by every instance representation (SPEC §2-3).

Numpy panoptic ids and ``segments_info`` in, numpy arrays out; never sees a config.
"""

from typing import Iterable, List, Tuple

import numpy as np

__all__ = ["semantic_targets"]


def semantic_targets(
    panoptic: np.ndarray,
    segments_info: List[dict],
    ignore_label: int,
    thing_ids: Iterable[int],
    small_instance_area: int,
    small_instance_weight: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """Semantic labels and per-pixel loss weights of one panoptic annotation.

    Args:
        panoptic: int [H, W] segment ids; pixels whose id has no listed segment are void.
        segments_info: dicts with ``id``, contiguous ``category_id`` and optionally ``iscrowd``.
        ignore_label: label written on void and crowd pixels.
        thing_ids: contiguous ids of the thing classes.
        small_instance_area: non-crowd thing segments with fewer pixels than this...
        small_instance_weight: ...get this weight (DeeperLab's small-instance up-weighting).

    Returns:
        (``sem_seg`` int64 [H, W]: contiguous class, ``ignore_label`` on void and crowd;
        ``sem_seg_weights`` float32 [H, W]: ``small_instance_weight`` on small thing instances,
        1 on other labelled pixels, 0 where ``sem_seg`` is ``ignore_label``).
    """
    things = set(int(t) for t in thing_ids)
    ids, inverse = np.unique(panoptic, return_inverse=True)
    areas = np.bincount(inverse.ravel(), minlength=len(ids))
    position = {int(i): k for k, i in enumerate(ids)}
    labels = np.full(len(ids), ignore_label, dtype=np.int64)
    weights = np.ones(len(ids), dtype=np.float32)
    for seg in segments_info:
        k = position.get(int(seg["id"]))
        if k is None:  # listed but absent (e.g. cropped away)
            continue
        if seg.get("iscrowd", 0):
            labels[k], weights[k] = ignore_label, 0.0
            continue
        category = int(seg["category_id"])
        labels[k], weights[k] = category, 1.0
        if category in things and areas[k] < small_instance_area:
            weights[k] = small_instance_weight
    weights[labels == ignore_label] = 0.0
    inverse = inverse.reshape(panoptic.shape)
    return labels[inverse], weights[inverse]
