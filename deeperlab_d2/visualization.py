"""Pictures for people debugging a model: the instance branch's maps (keypoint heatmaps and
Hough score maps, or the center heatmap) with what the post-processing detected.

Every picture is drawn from :meth:`DeeperLab.predict` outputs and the result of
:meth:`DeeperLab.panoptic` with ``return_maps=True``: the same inference path as evaluation.
"""

from typing import Dict

import cv2
import numpy as np
import torch

from .layers.keypoints import KEYPOINT_NAMES

__all__ = ["center_maps_picture", "instance_maps_picture", "keypoint_maps_picture"]


def _colorize(m: np.ndarray, vmax: float) -> np.ndarray:
    """[H, W] float -> [H, W, 3] uint8 RGB with the "inferno"-like OpenCV colormap."""
    scaled = np.clip(m / max(vmax, 1e-12), 0, 1)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(bgr[..., ::-1])


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = np.array(tile, copy=True)
    cv2.putText(
        tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA
    )
    return tile


def _circles(tile: np.ndarray, ys, xs, color=(0, 255, 0)) -> np.ndarray:
    for y, x in zip(ys, xs):
        cv2.circle(tile, (int(round(x)), int(round(y))), 3, color, 1)
    return tile


@torch.no_grad()
def keypoint_maps_picture(image: np.ndarray, outputs: Dict[str, torch.Tensor], result: dict):
    """A grid: the image, then for each keypoint type its heatmap probability (top row) and its
    fused Hough score map with the detected keypoint candidates (bottom row).

    Args:
        image: [H, W, 3] uint8 RGB, the network input (the outputs' valid size).
        outputs: ``predict`` outputs of that single image (batch of one), cropped to H x W.
        result: its :meth:`DeeperLab.panoptic` result with ``return_maps=True``
            (``score_maps``, ``keypoint_candidates``).

    Returns:
        [2 * H, (P + 1) * W, 3] uint8 RGB picture.
    """
    heat = outputs["heatmap"][0].float().sigmoid().cpu().numpy()
    maps = result["score_maps"].cpu().numpy()
    cands = result["keypoint_candidates"]
    top = [_label(image, "input")]
    bottom = [_label(np.zeros_like(image), f"{len(cands['y'])} keypoints")]
    for k, name in enumerate(KEYPOINT_NAMES):
        top.append(_label(_colorize(heat[k], 1.0), f"heatmap {name}"))
        tile = _colorize(maps[k], float(maps[k].max()))
        sel = (cands["type"] == k).cpu()
        tile = _circles(tile, cands["y"][sel].tolist(), cands["x"][sel].tolist())
        bottom.append(_label(tile, f"score map {name}"))
    return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)


@torch.no_grad()
def center_maps_picture(image: np.ndarray, outputs: Dict[str, torch.Tensor], result: dict):
    """The image, the center heatmap with the detected centers, and the length of the
    predicted center offsets on thing pixels.

    Args: as :func:`keypoint_maps_picture` (``result`` needs ``instance_centers``).

    Returns:
        [H, 3 * W, 3] uint8 RGB picture.
    """
    heat = outputs["center_heatmap"][0, 0].float().cpu().numpy()
    offsets = outputs["center_offsets"][0, 0].float().norm(dim=0).cpu().numpy()
    thing = (result["instance_map"] >= 0).cpu().numpy()
    centers = result["instance_centers"].cpu()
    tile = _circles(_colorize(heat, 1.0), centers[:, 0].tolist(), centers[:, 1].tolist())
    offset_tile = _colorize(np.where(thing, offsets, 0.0), float(offsets[thing].max(initial=1.0)))
    return np.concatenate(
        [
            _label(image, "input"),
            _label(tile, f"center heatmap, {len(centers)} centers"),
            _label(offset_tile, "|center offset| on things"),
        ],
        1,
    )


PICTURES = {"keypoints": keypoint_maps_picture, "center": center_maps_picture}


def instance_maps_picture(representation: str, image, outputs, result) -> np.ndarray:
    """The debugging picture of an instance representation (see :data:`PICTURES`)."""
    if representation not in PICTURES:
        raise ValueError(f"no picture for instance representation {representation!r}")
    return PICTURES[representation](image, outputs, result)
