"""FPN variants of Xception-71 and (W-)MobileNetV2 for Detectron2's stock FPN models.

Registered in Detectron2's ``BACKBONE_REGISTRY`` like ``build_resnet_fpn_backbone`` and
``build_retinanet_resnet_fpn_backbone``, so that ``SemanticSegmentor`` (``SemSegFPNHead``),
``PanopticFPN``, ``GeneralizedRCNN`` (Faster / Mask R-CNN) and ``RetinaNet`` take the plugin's
backbones by config alone (``MODEL.BACKBONE.NAME``):

- ``build_xception71_fpn_backbone``: Xception-71 (``MODEL.XCEPTION``) + FPN + P6 by
  max-pooling (Detectron2's ``LastLevelMaxPool``);
- ``build_mobilenetv2_fpn_backbone``: (W-)MobileNetV2 (``MODEL.MOBILENETV2``) + FPN + P6;
- ``build_retinanet_xception71_fpn_backbone`` and ``build_retinanet_mobilenetv2_fpn_backbone``:
  the same with RetinaNet's P6 / P7 convs on res5 (``LastLevelP6P7``).

The FPN reads ``MODEL.FPN.IN_FEATURES`` (a subset of the bottom-up's ``OUT_FEATURES``),
``OUT_CHANNELS``, ``NORM`` and ``FUSE_TYPE``. Detectron2's FPN needs input strides that double
from one feature to the next: the stock models use the bottom-up at ``OUTPUT_STRIDE: 32``
(res2..res5 at strides 4, 8, 16, 32, no atrous convolution), not DeeperLab's output stride 16
(res4 and res5 both at stride 16); a config that mixes them fails with an error naming the key.
"""

from typing import Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from .mobilenet_v2 import build_mobilenetv2_backbone
from .xception import build_xception71_backbone

__all__ = [
    "build_fpn_on",
    "build_mobilenetv2_fpn_backbone",
    "build_retinanet_mobilenetv2_fpn_backbone",
    "build_retinanet_xception71_fpn_backbone",
    "build_xception71_fpn_backbone",
]


def check_fpn_in_features(bottom_up: Backbone, in_features: Sequence[str], node: str) -> None:
    """Check that ``MODEL.FPN.IN_FEATURES`` are bottom-up outputs with doubling strides.

    Args:
        bottom_up: the bottom-up backbone.
        in_features: ``MODEL.FPN.IN_FEATURES``.
        node: the bottom-up's config node, e.g. "MODEL.XCEPTION" (named in the messages).

    Raises:
        ValueError: naming the config key to change.
    """
    shapes = bottom_up.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if not in_features or missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES must be a non-empty list of outputs of the bottom-up "
            f"backbone ({node}.OUT_FEATURES = {sorted(shapes)}), got {list(in_features)}"
        )
    strides = [shapes[f].stride for f in in_features]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(
            f"FPN needs input strides that double from one feature to the next, but "
            f"MODEL.FPN.IN_FEATURES {list(in_features)} have strides {strides} at "
            f"{node}.OUTPUT_STRIDE = {getattr(bottom_up, 'output_stride', '?')}: set "
            f"{node}.OUTPUT_STRIDE 32 (no atrous convolution) for the stock FPN models"
        )


def build_fpn_on(cfg, bottom_up: Backbone, node: str, top_block: nn.Module) -> FPN:
    """Detectron2's :class:`FPN` of ``cfg.MODEL.FPN`` on ``bottom_up``.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        bottom_up: the bottom-up backbone.
        node: the bottom-up's config node (named in error messages).
        top_block: the extra levels after the last one (``LastLevelMaxPool`` or
            ``LastLevelP6P7``).

    Returns:
        the FPN backbone, outputs ``p<log2 stride>`` (e.g. p2..p6).
    """
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    check_fpn_in_features(bottom_up, in_features, node)
    last_stride = bottom_up.output_shape()[in_features[-1]].stride
    if isinstance(top_block, LastLevelMaxPool) and last_stride != 32:
        # Detectron2's FPN names its levels p<log2 stride>; the max-pool reads "p5"
        raise ValueError(
            f"P6 is max-pooled from P5: MODEL.FPN.IN_FEATURES must end with the stride-32 "
            f"feature (res5 at {node}.OUTPUT_STRIDE 32), got {in_features} ending at stride "
            f"{last_stride}"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def _p6p7(cfg, bottom_up: Backbone, node: str) -> LastLevelP6P7:
    """RetinaNet's P6 / P7 convs on the bottom-up's res5 (as Detectron2 does for ResNet)."""
    shapes = bottom_up.output_shape()
    if "res5" not in shapes:
        raise ValueError(
            f"RetinaNet's P6/P7 are computed from res5: add it to {node}.OUT_FEATURES "
            f"(got {sorted(shapes)})"
        )
    return LastLevelP6P7(shapes["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS)


@BACKBONE_REGISTRY.register()
def build_xception71_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Xception-71 (``cfg.MODEL.XCEPTION``) + FPN (``cfg.MODEL.FPN``) + P6 by max-pooling.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a Detectron2 :class:`FPN` backbone.
    """
    bottom_up = build_xception71_backbone(cfg, input_shape)
    return build_fpn_on(cfg, bottom_up, "MODEL.XCEPTION", LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """(W-)MobileNetV2 (``cfg.MODEL.MOBILENETV2``) + FPN (``cfg.MODEL.FPN``) + P6 by
    max-pooling.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a Detectron2 :class:`FPN` backbone.
    """
    bottom_up = build_mobilenetv2_backbone(cfg, input_shape)
    return build_fpn_on(cfg, bottom_up, "MODEL.MOBILENETV2", LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_xception71_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Xception-71 + FPN + RetinaNet's P6 / P7 convs on res5.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a Detectron2 :class:`FPN` backbone.
    """
    bottom_up = build_xception71_backbone(cfg, input_shape)
    node = "MODEL.XCEPTION"
    return build_fpn_on(cfg, bottom_up, node, _p6p7(cfg, bottom_up, node))


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """(W-)MobileNetV2 + FPN + RetinaNet's P6 / P7 convs on res5.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a Detectron2 :class:`FPN` backbone.
    """
    bottom_up = build_mobilenetv2_backbone(cfg, input_shape)
    node = "MODEL.MOBILENETV2"
    return build_fpn_on(cfg, bottom_up, node, _p6p7(cfg, bottom_up, node))
