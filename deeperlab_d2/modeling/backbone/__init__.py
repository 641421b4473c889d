"""Backbones of deeperlab_d2: Xception-71 and the wider MobileNetV2 (W-MNV2), and their FPNs.

Importing this package registers ``build_xception71_backbone`` and
``build_mobilenetv2_backbone`` in Detectron2's ``BACKBONE_REGISTRY``, and their FPN variants for
Detectron2's stock FPN models (``build_xception71_fpn_backbone``,
``build_mobilenetv2_fpn_backbone`` and the RetinaNet ones with P6 / P7, see :mod:`.fpn`).
"""

from .fpn import (
    build_fpn_on,
    build_mobilenetv2_fpn_backbone,
    build_retinanet_mobilenetv2_fpn_backbone,
    build_retinanet_xception71_fpn_backbone,
    build_xception71_fpn_backbone,
)
from .mobilenet_v2 import (
    D2MobileNetV2,
    InvertedResidual,
    MobileNetV2,
    build_mobilenetv2_backbone,
)
from .xception import (
    D2Xception71,
    SeparableConv2d,
    Xception71,
    XceptionBlock,
    build_xception71_backbone,
)

__all__ = [
    "D2MobileNetV2",
    "D2Xception71",
    "InvertedResidual",
    "MobileNetV2",
    "SeparableConv2d",
    "Xception71",
    "XceptionBlock",
    "build_fpn_on",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "build_retinanet_mobilenetv2_fpn_backbone",
    "build_retinanet_xception71_fpn_backbone",
    "build_xception71_backbone",
    "build_xception71_fpn_backbone",
]
