"""Wider MobileNetV2 (W-MNV2) of DeeperLab as a Detectron2 backbone.

MobileNetV2 (Sandler et al. 2018) inverted residual blocks, with every depthwise conv made
``kernel_size x kernel_size`` (5 in DeeperLab's W-MNV2, 3 in the original network) and the
final 1x1 conv to 1280 channels dropped. Stage table (expansion t, channels c, repeats n,
stride s) after a 3x3 stride-2 stem of ``32 * width_mult`` channels:

=====  ===  ===  ===  ======
t      c    n    s    output
=====  ===  ===  ===  ======
1      16   1    1
6      24   2    2    res2 (stride 4)
6      32   3    2    res3 (stride 8)
6      64   4    2
6      96   3    1    res4 (stride 16)
6      160  3    2
6      320  1    1    res5 (stride 32)
=====  ===  ===  ===  ======

Atrous (DeepLab scheme): once the running stride reaches ``output_stride``, later strides become
1 and the dilation of the following blocks is multiplied by the removed stride (the block whose
stride is removed keeps the previous dilation). Output stride 16 removes the stride of the 160
stage, output stride 8 also the one of the 64 stage.
"""

from typing import Optional, Sequence

import torch
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .common import (
    StagedNetwork,
    check_output_stride_and_features,
)

__all__ = [
    "make_divisible",
    "InvertedResidual",
    "MobileNetV2",
    "build_mobilenetv2_backbone",
]


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (MobileNet rule).

    Args:
        value: the unrounded channel count (e.g. ``c * width_mult``).
        divisor: the multiple to round to.
        min_value: the smallest result allowed (defaults to ``divisor``).

    Returns:
        the rounded count, never more than 10% below ``value``.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise KxK -> linear 1x1 projection.

    The expansion conv is skipped when ``expand_ratio == 1``. A residual connection is used
    when the block keeps the resolution (stride 1) and the number of channels.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise conv (1 or 2).
        expand_ratio: hidden channels = ``in_channels * expand_ratio``.
        kernel_size: depthwise kernel size (odd).
        dilation: dilation of the depthwise conv.
        norm: Detectron2 norm name.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        kernel_size: int = 5,
        dilation: int = 1,
        norm: str = "BN",
    ):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(
                Conv2d(
                    in_channels,
                    hidden,
                    kernel_size=1,
                    bias=False,
                    norm=get_norm(norm, hidden),
                    activation=nn.ReLU6(inplace=True),
                )
            )
        layers.append(
            Conv2d(
                hidden,
                hidden,
                kernel_size=kernel_size,
                stride=stride,
                padding=dilation * (kernel_size - 1) // 2,
                dilation=dilation,
                groups=hidden,
                bias=False,
                norm=get_norm(norm, hidden),
                activation=nn.ReLU6(inplace=True),
            )
        )
        layers.append(
            Conv2d(
                hidden, out_channels, kernel_size=1, bias=False, norm=get_norm(norm, out_channels)
            )
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, in_channels, H, W) tensor.

        Returns:
            (N, out_channels, H / stride, W / stride) tensor.
        """
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(StagedNetwork):
    """(Wider) MobileNetV2 encoder (plain ``nn.Module``), see the module docstring.

    Args:
        in_channels: input image channels.
        output_stride: 8, 16 or 32; stride of the last feature (atrous convs beyond it).
        norm: Detectron2 norm name.
        out_features: features returned by :meth:`forward`, a subset of res2..res5. ``None``
            means all four. Stages after the last requested feature are not built.
        width_mult: channel width multiplier (> 0), rounded to multiples of 8.
        kernel_size: kernel of every depthwise conv (odd, >= 3); 5 for W-MNV2.
    """

    # (expand ratio t, channels c, repeats n, stride s, output feature name or None)
    STAGES = (
        (1, 16, 1, 1, None),
        (6, 24, 2, 2, "res2"),
        (6, 32, 3, 2, "res3"),
        (6, 64, 4, 2, None),
        (6, 96, 3, 1, "res4"),
        (6, 160, 3, 2, None),
        (6, 320, 1, 1, "res5"),
    )

    def __init__(
        self,
        in_channels: int = 3,
        output_stride: int = 16,
        norm: str = "BN",
        out_features: Optional[Sequence[str]] = None,
        width_mult: float = 1.0,
        kernel_size: int = 5,
    ):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size}")
        self.width_mult = width_mult
        self.kernel_size = kernel_size

        stem_channels = make_divisible(32 * width_mult)
        self.stem = Conv2d(
            in_channels,
            stem_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            bias=False,
            norm=get_norm(norm, stem_channels),
            activation=nn.ReLU6(inplace=True),
        )

        self._start_stages(output_stride, out_features)
        prev = stem_channels
        for idx, (t, c, n, s, feature) in enumerate(self.STAGES):
            out_channels = make_divisible(c * width_mult)
            blocks = []
            for i in range(n):
                block_stride, block_dilation = self._atrous(s if i == 0 else 1)
                blocks.append(
                    InvertedResidual(
                        prev,
                        out_channels,
                        stride=block_stride,
                        expand_ratio=t,
                        kernel_size=kernel_size,
                        dilation=block_dilation,
                        norm=norm,
                    )
                )
                prev = out_channels
            if self._add_stage(f"stage{idx + 1}", nn.Sequential(*blocks), feature, prev):
                break

        self.init_conv_weights()


class D2MobileNetV2(MobileNetV2, Backbone):
    """Detectron2 :class:`Backbone` adapter of :class:`MobileNetV2`.

    Args:
        cfg: Detectron2 config with the ``MODEL.MOBILENETV2`` keys.
        input_shape: input :class:`ShapeSpec` (its ``channels`` is used).
    """

    def __init__(self, cfg, input_shape: ShapeSpec):
        node = cfg.MODEL.MOBILENETV2
        _check_cfg(node.OUTPUT_STRIDE, list(node.OUT_FEATURES), node.WIDTH_MULT, node.KERNEL_SIZE)
        super().__init__(
            in_channels=input_shape.channels,
            output_stride=node.OUTPUT_STRIDE,
            norm=node.NORM,
            out_features=list(node.OUT_FEATURES),
            width_mult=float(node.WIDTH_MULT),
            kernel_size=node.KERNEL_SIZE,
        )


def _check_cfg(output_stride, out_features, width_mult, kernel_size) -> None:
    """Validate the ``MODEL.MOBILENETV2`` config values.

    Args:
        output_stride: ``MODEL.MOBILENETV2.OUTPUT_STRIDE``.
        out_features: ``MODEL.MOBILENETV2.OUT_FEATURES``.
        width_mult: ``MODEL.MOBILENETV2.WIDTH_MULT``.
        kernel_size: ``MODEL.MOBILENETV2.KERNEL_SIZE``.

    Raises:
        ValueError: naming the offending key.
    """
    prefix = "MODEL.MOBILENETV2"
    check_output_stride_and_features(prefix, output_stride, out_features)
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"{prefix}.WIDTH_MULT must be a number > 0, got {width_mult}")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 3
        or kernel_size % 2 == 0
    ):
        raise ValueError(f"{prefix}.KERNEL_SIZE must be an odd integer >= 3, got {kernel_size}")


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build the (wider) MobileNetV2 from ``cfg.MODEL.MOBILENETV2``.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a :class:`D2MobileNetV2` backbone with outputs ``cfg.MODEL.MOBILENETV2.OUT_FEATURES``.
    """
    return D2MobileNetV2(cfg, input_shape)
