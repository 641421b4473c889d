"""DeeperLab training targets from a panoptic annotation (SPEC §2).

The generator never sees a Detectron2 config: numpy panoptic ids and ``segments_info`` in,
documented tensors out. All coordinates are pixel coordinates at the resolution of the
panoptic map, in ``(y, x)`` order, and every offset is stored as ``(dy, dx)``.

Keypoints (``P = 5`` per non-crowd thing instance) and their relation graph are defined once, in
:mod:`deeperlab_d2.layers.keypoints` (re-exported here).
"""

from typing import Dict, List, Sequence

import numpy as np
import torch

from ..layers.keypoints import (  # noqa: F401  (re-exported)
    CENTER,
    KEYPOINT_EDGES,
    KEYPOINT_NAMES,
    NUM_EDGES,
    NUM_KEYPOINTS,
    OFFSET_ORDER,
)
from .semantic_targets import semantic_targets


def instance_keypoints(mask: np.ndarray) -> np.ndarray:
    """Keypoints of one instance.

    Args:
        mask: bool [H, W], the instance's pixels (must not be empty).

    Returns:
        float64 [P, 2], (y, x) in pixels, in the order of :data:`KEYPOINT_NAMES`.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("instance_keypoints() got an empty mask")
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    return np.array(
        [[y0, x0], [y0, x1], [y1, x0], [y1, x1], [ys.mean(), xs.mean()]], dtype=np.float64
    )


class DeeperLabTargetGenerator:
    """Turns one panoptic annotation into DeeperLab's dense training targets.

    Args:
        ignore_label: semantic label written on void and crowd pixels.
        thing_ids: contiguous category ids that are things (others are stuff).
        keypoint_radius: radius R (px) of the keypoint disks.
        small_instance_area: thing instances with fewer pixels get ``small_instance_weight``.
        small_instance_weight: semantic-loss weight of the pixels of small thing instances.
        ignore_void_in_heatmap: if True the heatmap loss also ignores void pixels (crowd pixels
            are always ignored).

    Calling the generator returns a dict of tensors (``H, W`` = the panoptic map's size):

    * ``sem_seg`` int64 [H, W]: contiguous class, ``ignore_label`` on void and crowd pixels.
    * ``sem_seg_weights`` float32 [H, W]: ``small_instance_weight`` on pixels of non-crowd thing
      instances smaller than ``small_instance_area``, 1 elsewhere (0 where ignored).
    * ``heatmap`` float32 [P, H, W]: 1 inside the disk of radius R around keypoint k of any
      instance, else 0. It is also the mask of the short-range offsets of keypoint k and of
      the middle-range offsets of every edge leaving k.
    * ``heatmap_weights`` float32 [H, W]: 0 on crowd (and, if asked, void) pixels, else 1.
    * ``short_offsets`` float32 [P, 2, H, W]: inside a disk of keypoint k, ``y_jk - x`` for the
      instance j whose keypoint k is nearest; 0 elsewhere.
    * ``mid_offsets`` float32 [E, 2, H, W]: for edge e = (k, l), inside a disk of keypoint k,
      ``y_jl - x`` for that same nearest instance j; 0 elsewhere.
    * ``long_offsets`` float32 [P, 2, H, W]: at every pixel x of non-crowd thing instance j,
      ``y_jk - x``; 0 elsewhere.
    * ``long_offset_weights`` float32 [H, W]: 1 on pixels of non-crowd thing instances.
    * ``keypoints`` float32 [J, P, 2]: keypoints (y, x) of the J non-crowd thing instances.
    """

    def __init__(
        self,
        ignore_label: int,
        thing_ids: Sequence[int],
        *,
        keypoint_radius: float,
        small_instance_area: int,
        small_instance_weight: float,
        ignore_void_in_heatmap: bool,
    ):
        if keypoint_radius <= 0:
            raise ValueError(f"keypoint_radius must be > 0, got {keypoint_radius}")
        self.ignore_label = ignore_label
        self.thing_ids = set(int(t) for t in thing_ids)
        self.keypoint_radius = float(keypoint_radius)
        self.small_instance_area = small_instance_area
        self.small_instance_weight = small_instance_weight
        self.ignore_void_in_heatmap = ignore_void_in_heatmap

    def __call__(self, panoptic: np.ndarray, segments_info: List[dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            panoptic: int [H, W] segment ids; pixels whose id has no segment are void.
            segments_info: dicts with ``id``, ``category_id`` (contiguous) and optionally
                ``iscrowd`` (default 0), as produced by Detectron2's panoptic loaders.

        Returns:
            the dict documented on the class.
        """
        if panoptic.ndim != 2:
            raise ValueError(f"panoptic must be [H, W], got shape {panoptic.shape}")
        height, width = panoptic.shape
        P, R = NUM_KEYPOINTS, self.keypoint_radius

        sem_seg, sem_weights = semantic_targets(
            panoptic,
            segments_info,
            self.ignore_label,
            self.thing_ids,
            self.small_instance_area,
            self.small_instance_weight,
        )
        heat_weights = np.ones((height, width), dtype=np.float32)
        if self.ignore_void_in_heatmap:
            heat_weights[:] = 0.0
        long_offsets = np.zeros((P, 2, height, width), dtype=np.float32)
        long_weights = np.zeros((height, width), dtype=np.float32)

        instance_keypoints_list = []
        for seg in segments_info:
            mask = panoptic == seg["id"]
            if not mask.any():
                continue
            category = int(seg["category_id"])
            crowd = bool(seg.get("iscrowd", 0))
            if crowd:
                heat_weights[mask] = 0.0
                continue
            if self.ignore_void_in_heatmap:
                heat_weights[mask] = 1.0
            if category not in self.thing_ids:
                continue
            kps = instance_keypoints(mask)
            instance_keypoints_list.append(kps)
            ys, xs = np.nonzero(mask)
            long_offsets[:, 0, ys, xs] = kps[:, 0:1] - ys[None]
            long_offsets[:, 1, ys, xs] = kps[:, 1:2] - xs[None]
            long_weights[mask] = 1.0

        keypoints = (
            np.stack(instance_keypoints_list).astype(np.float32)
            if instance_keypoints_list
            else np.zeros((0, P, 2), dtype=np.float32)
        )
        heatmap, short_offsets, mid_offsets = self._disk_targets(keypoints, height, width, R)

        out = {
            "sem_seg": sem_seg,
            "sem_seg_weights": sem_weights,
            "heatmap": heatmap,
            "heatmap_weights": heat_weights,
            "short_offsets": short_offsets,
            "mid_offsets": mid_offsets,
            "long_offsets": long_offsets,
            "long_offset_weights": long_weights,
            "keypoints": keypoints,
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    @staticmethod
    def _disk_targets(keypoints: np.ndarray, height: int, width: int, radius: float):
        """Heatmaps, short- and mid-range offsets from the disks around the keypoints.

        Where disks of the same keypoint type overlap, the instance whose keypoint is nearest
        wins (ties: the earlier instance). Works on the (2R+1)^2 window of each disk only.
        """
        P, E = NUM_KEYPOINTS, NUM_EDGES
        heatmap = np.zeros((P, height, width), dtype=np.float32)
        short_offsets = np.zeros((P, 2, height, width), dtype=np.float32)
        mid_offsets = np.zeros((E, 2, height, width), dtype=np.float32)
        best = np.full((P, height, width), np.inf, dtype=np.float64)
        edges_from = [
            [e for e, (src, _) in enumerate(KEYPOINT_EDGES) if src == k] for k in range(P)
        ]
        r2 = radius * radius
        for kps in keypoints:
            for k in range(P):
                cy, cx = float(kps[k, 0]), float(kps[k, 1])
                y0 = max(int(np.ceil(cy - radius)), 0)
                y1 = min(int(np.floor(cy + radius)), height - 1)
                x0 = max(int(np.ceil(cx - radius)), 0)
                x1 = min(int(np.floor(cx + radius)), width - 1)
                if y0 > y1 or x0 > x1:
                    continue
                gy, gx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
                dy, dx = cy - gy, cx - gx
                d2 = dy * dy + dx * dx
                win = best[k, y0 : y1 + 1, x0 : x1 + 1]
                take = (d2 <= r2) & (d2 < win)
                if not take.any():
                    continue
                win[take] = d2[take]
                ty, tx = gy[take], gx[take]
                heatmap[k, ty, tx] = 1.0
                short_offsets[k, 0, ty, tx] = dy[take]
                short_offsets[k, 1, ty, tx] = dx[take]
                for e in edges_from[k]:
                    tgt = KEYPOINT_EDGES[e][1]
                    mid_offsets[e, 0, ty, tx] = kps[tgt, 0] - ty
                    mid_offsets[e, 1, ty, tx] = kps[tgt, 1] - tx
        return heatmap, short_offsets, mid_offsets
