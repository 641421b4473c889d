"""Torch-only layers of DeeperLab (no Detectron2 import here or below).

``hough_voting`` is the keypoint Hough-voting op (compiled C++/CUDA kernel from
``deeperlab_d2._C`` when built, pure-PyTorch ``hough_voting_reference`` otherwise);
``splat_points`` (``splat_points_reference``) its sparse entry point, voting from a list of points.
``post_processing`` is DeeperLab's post-processing (fused CPU kernels ``class_argmax`` and
``keypoint_votes`` where built, with pure-PyTorch references); ``center_post_processing`` is
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
