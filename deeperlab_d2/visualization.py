"""Pictures for people debugging a DeeperLab model: keypoint heatmaps and Hough score maps."""

from typing import Sequence

import cv2
import numpy as np
import torch

from .data.target_generator import KEYPOINT_NAMES
from .layers.post_processing import (
    PostProcessConfig,
    find_keypoints,
    hough_score_maps,
    refine_long_offsets,
)


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


@torch.no_grad()
def keypoint_maps_picture(
    image: np.ndarray,
    outputs: dict,
    thing_ids: Sequence[int],
    cfg: PostProcessConfig,
) -> np.ndarray:
    """A grid: the image, then for each keypoint type its heatmap probability (top row) and its
    fused Hough score map with the detected keypoint candidates (bottom row).

    Args:
        image: [H, W, 3] uint8 RGB, the network input (same size as the outputs).
        outputs: ``DeeperLab.predict`` outputs of that single image (batch of one).
        thing_ids: contiguous thing class ids.
        cfg: post-processing thresholds.

    Returns:
        [2 * H, (P + 1) * W, 3] uint8 RGB picture.
    """
    heat = outputs["heatmap"].sigmoid()
    semantic = outputs["sem_seg"].argmax(1)
    is_thing = torch.zeros(outputs["sem_seg"].shape[1], dtype=torch.bool, device=heat.device)
    is_thing[list(thing_ids)] = True
    thing_mask = is_thing[semantic]
    ys, xs = torch.nonzero(thing_mask[0], as_tuple=True)
    long = torch.zeros_like(outputs["long_offsets"])
    long[0][:, :, ys, xs] = refine_long_offsets(
        outputs["long_offsets"][0], outputs["short_offsets"][0], ys, xs, cfg.refine_steps
    )
    maps = hough_score_maps(heat, outputs["short_offsets"], long, thing_mask, cfg)
    (cands,) = find_keypoints(maps, cfg)
    heat_np, maps_np = heat[0].cpu().numpy(), maps[0].cpu().numpy()
    top = [_label(image, "input")]
    bottom = [_label(np.zeros_like(image), f"{len(cands['y'])} keypoints")]
    for k, name in enumerate(KEYPOINT_NAMES):
        top.append(_label(_colorize(heat_np[k], 1.0), f"heatmap {name}"))
        tile = _colorize(maps_np[k], float(maps_np[k].max()))
        sel = (cands["type"] == k).cpu()
        for y, x in zip(cands["y"][sel].tolist(), cands["x"][sel].tolist()):
            cv2.circle(tile, (int(round(x)), int(round(y))), 3, (0, 255, 0), 1)
        bottom.append(_label(tile, f"score map {name}"))
    return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
