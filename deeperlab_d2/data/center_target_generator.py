"""Panoptic-DeepLab training targets (SPEC §5): a Gaussian center heatmap and center offsets.

The generator never sees a Detectron2 config: numpy panoptic ids and ``segments_info`` in,
documented tensors out. Coordinates are pixels of the panoptic map, ``(y, x)``; offsets are
``(dy, dx)``.
"""

import math
from typing import Dict, List, Sequence

import numpy as np
import torch

from .semantic_targets import semantic_targets

__all__ = ["CenterTargetGenerator"]


class CenterTargetGenerator:
    """Turns one panoptic annotation into Panoptic-DeepLab's dense training targets.

    Args:
        ignore_label: semantic label written on void and crowd pixels.
        thing_ids: contiguous category ids that are things.
        sigma: standard deviation (px) of the Gaussian placed at each center (8 in the paper).
        small_instance_area, small_instance_weight: semantic-loss weight of the pixels of small
            thing instances (as for DeeperLab).

    Calling the generator returns a dict of tensors (``H, W`` = the panoptic map's size):

    * ``sem_seg`` int64 [H, W] and ``sem_seg_weights`` float32 [H, W]: see
      :func:`~deeperlab_d2.data.semantic_targets.semantic_targets`.
    * ``center_heatmap`` float32 [1, H, W]: for every non-crowd thing instance, a Gaussian
      ``exp(-((y - cy)^2 + (x - cx)^2) / (2 sigma^2))`` around its center of mass rounded to the
      nearest pixel ``(cy, cx)``, evaluated in the square window ``|y - cy|, |x - cx| <=
      ceil(3 sigma) + 1`` (0 outside it; Detectron2's window for an integer sigma); where
      instances overlap, the maximum.
    * ``center_weights`` float32 [H, W]: 1 on labelled non-crowd pixels (things and stuff), 0
      on void and crowd pixels.
    * ``center_offsets`` float32 [2, H, W]: at every pixel of non-crowd thing instance j,
      ``c_j - pixel`` with ``c_j`` its (unrounded) center of mass; 0 elsewhere.
    * ``center_offset_weights`` float32 [H, W]: 1 on pixels of non-crowd thing instances.
    * ``centers`` float32 [J, 2]: the centers of mass (y, x) of the J non-crowd thing instances.
    """

    def __init__(
        self,
        *,
        ignore_label: int,
        thing_ids: Sequence[int],
        sigma: float,
        small_instance_area: int,
        small_instance_weight: float,
    ):
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.ignore_label = ignore_label
        self.thing_ids = set(int(t) for t in thing_ids)
        self.sigma = float(sigma)
        self.small_instance_area = small_instance_area
        self.small_instance_weight = small_instance_weight
        r = int(math.ceil(3 * self.sigma)) + 1
        d = np.arange(-r, r + 1, dtype=np.float64)
        self._radius = r
        self._gaussian = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * self.sigma**2))

    def __call__(self, panoptic: np.ndarray, segments_info: List[dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            panoptic: int [H, W] segment ids; pixels whose id has no segment are void.
            segments_info: dicts with ``id``, ``category_id`` (contiguous) and optionally
                ``iscrowd`` (default 0).

        Returns:
            the dict documented on the class.
        """
        if panoptic.ndim != 2:
            raise ValueError(f"panoptic must be [H, W], got shape {panoptic.shape}")
        height, width = panoptic.shape
        sem_seg, sem_weights = semantic_targets(
            panoptic,
            segments_info,
            self.ignore_label,
            self.thing_ids,
            self.small_instance_area,
            self.small_instance_weight,
        )
        heatmap = np.zeros((1, height, width), dtype=np.float32)
        weights = (sem_seg != self.ignore_label).astype(np.float32)
        offsets = np.zeros((2, height, width), dtype=np.float32)
        offset_weights = np.zeros((height, width), dtype=np.float32)
        centers = []
        r = self._radius
        for seg in segments_info:
            if seg.get("iscrowd", 0) or int(seg["category_id"]) not in self.thing_ids:
                continue
            ys, xs = np.nonzero(panoptic == seg["id"])
            if ys.size == 0:
                continue
            cy, cx = ys.mean(), xs.mean()
            centers.append((cy, cx))
            offsets[0, ys, xs] = cy - ys
            offsets[1, ys, xs] = cx - xs
            offset_weights[ys, xs] = 1.0
            py, px = int(round(cy)), int(round(cx))
            y0, y1 = max(py - r, 0), min(py + r, height - 1)
            x0, x1 = max(px - r, 0), min(px + r, width - 1)
            if y0 > y1 or x0 > x1:
                continue
            g = self._gaussian[y0 - py + r : y1 - py + r + 1, x0 - px + r : x1 - px + r + 1]
            window = heatmap[0, y0 : y1 + 1, x0 : x1 + 1]
            np.maximum(window, g, out=window)
        out = {
            "sem_seg": sem_seg,
            "sem_seg_weights": sem_weights,
            "center_heatmap": heatmap,
            "center_weights": weights,
            "center_offsets": offsets,
            "center_offset_weights": offset_weights,
            "centers": np.array(centers, dtype=np.float32).reshape(-1, 2),
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
