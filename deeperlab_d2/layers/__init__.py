"""Torch-only layers of DeeperLab (no Detectron2 import here or below).

``hough_voting`` is the keypoint Hough-voting op (compiled C++/CUDA kernel from
``deeperlab_d2._C`` when built, pure-PyTorch ``hough_voting_reference`` otherwise);
``splat_points`` (``splat_points_reference``) its sparse entry point, voting from a list of points.
``post_processing`` is DeeperLab's post-processing (compiled CPU kernels ``class_argmax``,
``keypoint_votes``, ``assign_pixels``, ``cells_above``, ``panoptic_histogram`` and
``panoptic_lookup`` where built, each with a pure-PyTorch reference); ``center_post_processing`` is
Panoptic-DeepLab's post-processing (center heatmap + offsets).
"""

from .center_post_processing import CenterPostProcessConfig, panoptic_deeplab_inference
from .hough_voting import (
    HAS_COMPILED_OP,
    ReferenceFallbackWarning,
    compiled_op_available,
    compiled_with_cuda,
    hough_voting,
    hough_voting_reference,
    splat_points,
    splat_points_reference,
)

__all__ = [
    "CenterPostProcessConfig",
    "HAS_COMPILED_OP",
    "ReferenceFallbackWarning",
    "compiled_op_available",
    "compiled_with_cuda",
    "hough_voting",
    "hough_voting_reference",
    "panoptic_deeplab_inference",
    "splat_points",
    "splat_points_reference",
]
