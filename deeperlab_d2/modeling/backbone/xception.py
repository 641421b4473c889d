"""Xception-71 ("modified aligned Xception" of DeepLabv3+) as a Detectron2 backbone.

Blocks (TF DeepLab ``xception_71``), every conv except the two stem convs and the 1x1 shortcuts
is depthwise-separable; downsampling uses a strided separable conv instead of max-pooling:

===================  =======================  ========  ==========  =======
flow / block         separable conv channels  stride    shortcut    output
===================  =======================  ========  ==========  =======
stem                 conv3x3 32 s2, conv 64   2
entry 1              128, 128, 128            2         1x1 conv
entry 2              256, 256, 256            1         1x1 conv    res2
entry 3              256, 256, 256            2         1x1 conv
entry 4              728, 728, 728            1         1x1 conv    res3
entry 5              728, 728, 728            2         1x1 conv
middle 1..16         728, 728, 728            1         identity    res4
exit 1               728, 1024, 1024          2         1x1 conv
exit 2               1536, 1536, 2048         1         none        res5
===================  =======================  ========  ==========  =======

Depth: 2 stem convs + (5 entry + 16 middle + 2 exit) blocks * 3 separable convs = 2 + 69 = 71.

Two layouts (``layout``, ``MODEL.XCEPTION.LAYOUT``) place the ReLUs differently; they have the
same parameters (identical state_dict keys and shapes), so a checkpoint loads into either:

* ``"paper"`` (default): the DeepLabv3+ paper's text ("Extra batch normalization and ReLU
  activation are added after each 3 x 3 depthwise convolution"). Every separable conv is
  ``depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU``; in a block with a shortcut the last
  pointwise BN is summed with the shortcut and the sum goes through ReLU
  (``ReLU(branch + shortcut)``), so every feature is rectified.
* ``"tf_deeplab"``: the released TF DeepLab ``xception_71`` code and its ImageNet checkpoint,
  i.e. timm's ``xception71`` (what ``python -m deeperlab_d2.convert xception71`` converts: with
  this layout the converted backbone computes timm's features exactly). A block with a shortcut
  is pre-activation: ``ReLU -> depthwise -> BN -> pointwise -> BN`` three times (a ReLU before
  each separable conv, none between the depthwise BN and the pointwise conv), plus the shortcut
  (1x1 conv + BN, or identity) which reads the block input *before* that first ReLU, and the
  sum is returned without ReLU. The block without shortcut (exit_flow2) is
  ``depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU`` three times in both layouts (TF's
  ``activation_fn_in_separable_conv=True``, timm's ``start_with_relu=False``). The stem (two
  conv + BN + ReLU) is the same in both. So res2, res3 and res4 (block sums) are not rectified
  in this layout; res5 (exit_flow2's last ReLU) is.

Atrous (DeepLab scheme): once the running stride reaches ``output_stride``, every later stride
becomes 1 and the dilation of the following layers is multiplied by the removed stride (the
block whose stride is removed keeps the previous dilation). At output stride 16 the exit flow
runs at dilation 1 (exit 1) / 2 (exit 2); at output stride 8 the middle flow runs at dilation
2 and the exit flow at 2 / 4.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from ..blocks import SeparableConv2d
from .common import (
    StagedNetwork,
    check_output_stride_and_features,
)

__all__ = [
    "XCEPTION_LAYOUTS",
    "SeparableConv2d",
    "XceptionBlock",
    "Xception71",
    "build_xception71_backbone",
]

#: the ReLU placements of :class:`Xception71` (``MODEL.XCEPTION.LAYOUT``), see the module
#: docstring: the DeepLabv3+ paper's text, and the released TF DeepLab / timm network
XCEPTION_LAYOUTS = ("paper", "tf_deeplab")


def _check_layout(layout: str) -> None:
    if layout not in XCEPTION_LAYOUTS:
        raise ValueError(f"Xception layout must be one of {XCEPTION_LAYOUTS}, got {layout!r}")


class XceptionBlock(nn.Module):
    """Three separable convs (the last one strided) with a conv, identity or no shortcut.

    Layout ``"paper"``: with a shortcut, the last pointwise conv is normalized, summed with the
    shortcut and then passed through ReLU. Layout ``"tf_deeplab"``: with a shortcut, the block
    is pre-activation (``pre_activation``): ReLU before each separable conv, none between the
    depthwise BN and the pointwise conv nor after the sum; the shortcut reads the unrectified
    input. Without a shortcut both layouts are the same (ReLU after every BN).

    Args:
        in_channels: input channels.
        channels: output channels of the three separable convs.
        stride: stride of the last separable conv (and of the 1x1 conv shortcut).
        dilation: dilation of the three depthwise convs.
        shortcut: "conv" (1x1 conv + norm), "identity" or "none".
        norm: Detectron2 norm name.
        layout: "paper" or "tf_deeplab" (see the module docstring); same parameters.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        stride: int = 1,
        dilation: int = 1,
        shortcut: str = "conv",
        norm: str = "BN",
        layout: str = "paper",
    ):
        super().__init__()
        _check_layout(layout)
        if len(channels) != 3:
            raise ValueError(f"An Xception block has 3 separable convs, got channels={channels}")
        if shortcut not in ("conv", "identity", "none"):
            raise ValueError(f"shortcut must be 'conv', 'identity' or 'none', got {shortcut!r}")
        if shortcut == "identity" and (stride != 1 or in_channels != channels[-1]):
            raise ValueError("An identity shortcut needs stride 1 and equal in/out channels")
        self.shortcut_type = shortcut
        has_shortcut = shortcut != "none"
        # tf_deeplab: ReLU before each separable conv (and the shortcut reads the input before
        # it), no ReLU inside the separable convs nor after the residual sum
        self.pre_activation = layout == "tf_deeplab" and has_shortcut

        convs = []
        prev = in_channels
        for i, out in enumerate(channels):
            last = i == len(channels) - 1
            conv = SeparableConv2d(
                prev,
                out,
                kernel_size=3,
                stride=stride if last else 1,
                dilation=dilation,
                norm=norm,
                last_activation=not (self.pre_activation or (last and has_shortcut)),
            )
            if self.pre_activation:
                conv.depthwise.activation = None  # a ReLU holds no parameter: same state_dict
            convs.append(conv)
            prev = out
        self.convs = nn.Sequential(*convs)

        if shortcut == "conv":
            self.shortcut = Conv2d(
                in_channels,
                channels[-1],
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, channels[-1]),
            )
        else:
            self.shortcut = None
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, in_channels, H, W) tensor.

        Returns:
            (N, channels[-1], H / stride, W / stride) tensor.
        """
        if self.pre_activation:
            out = x
            for i, conv in enumerate(self.convs):
                # the first ReLU not in place: the shortcut reads the unrectified x
                out = conv(F.relu(out, inplace=i > 0))
            residual = x if self.shortcut is None else self.shortcut(x)
            return out + residual
        out = self.convs(x)
        if self.shortcut_type == "none":
            return out
        residual = x if self.shortcut is None else self.shortcut(x)
        return torch.relu_(out + residual)


class Xception71(StagedNetwork):
    """Xception-71 encoder (plain ``nn.Module``), see the module docstring for the layout.

    Args:
        in_channels: input image channels.
        output_stride: 8, 16 or 32; stride of the last feature (atrous convs beyond it).
        norm: Detectron2 norm name ("BN", "SyncBN", "FrozenBN", ...). Note that "GN" (32
            groups) does not divide the 728-channel layers.
        out_features: features returned by :meth:`forward`, a subset of res2..res5. ``None``
            means all four. Layers after the last requested feature are not built.
        num_middle_blocks: number of middle-flow blocks (16 for Xception-71).
        layout: ReLU placement, "paper" (the DeepLabv3+ paper's text) or "tf_deeplab" (the
            released TF DeepLab / timm network, for converted ImageNet weights); both have the
            same parameters. See the module docstring.
    """

    # (name, channels, stride, shortcut, output feature name or None)
    ENTRY_FLOW = (
        ("entry_flow1", (128, 128, 128), 2, "conv", None),
        ("entry_flow2", (256, 256, 256), 1, "conv", "res2"),
        ("entry_flow3", (256, 256, 256), 2, "conv", None),
        ("entry_flow4", (728, 728, 728), 1, "conv", "res3"),
        ("entry_flow5", (728, 728, 728), 2, "conv", None),
    )
    MIDDLE_CHANNELS = (728, 728, 728)
    EXIT_FLOW = (
        ("exit_flow1", (728, 1024, 1024), 2, "conv", None),
        ("exit_flow2", (1536, 1536, 2048), 1, "none", "res5"),
    )

    def __init__(
        self,
        in_channels: int = 3,
        output_stride: int = 16,
        norm: str = "BN",
        out_features: Optional[Sequence[str]] = None,
        num_middle_blocks: int = 16,
        layout: str = "paper",
    ):
        super().__init__()
        _check_layout(layout)
        self.layout = layout
        self.stem = nn.Sequential(
            Conv2d(
                in_channels,
                32,
                kernel_size=3,
                stride=2,
                padding=1,
                bias=False,
                norm=get_norm(norm, 32),
                activation=nn.ReLU(inplace=True),
            ),
            Conv2d(
                32,
                64,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=False,
                norm=get_norm(norm, 64),
                activation=nn.ReLU(inplace=True),
            ),
        )

        # Block specs in order; the middle flow output is "res4".
        specs = list(self.ENTRY_FLOW)
        for i in range(num_middle_blocks):
            name = "res4" if i == num_middle_blocks - 1 else None
            specs.append((f"middle_flow{i + 1}", self.MIDDLE_CHANNELS, 1, "identity", name))
        specs.extend(self.EXIT_FLOW)

        self._start_stages(output_stride, out_features)
        prev = 64
        for name, channels, stride, shortcut, feature in specs:
            block_stride, block_dilation = self._atrous(stride)
            block = XceptionBlock(
                prev,
                channels,
                block_stride,
                block_dilation,
                shortcut=shortcut,
                norm=norm,
                layout=layout,
            )
            prev = block.out_channels
            if self._add_stage(name, block, feature, prev):
                break

        self.init_conv_weights(nonlinearity="relu")


class D2Xception71(Xception71, Backbone):
    """Detectron2 :class:`Backbone` adapter of :class:`Xception71`.

    Args:
        cfg: Detectron2 config with the ``MODEL.XCEPTION`` keys.
        input_shape: input :class:`ShapeSpec` (its ``channels`` is used).
    """

    def __init__(self, cfg, input_shape: ShapeSpec):
        output_stride = cfg.MODEL.XCEPTION.OUTPUT_STRIDE
        out_features = list(cfg.MODEL.XCEPTION.OUT_FEATURES)
        check_output_stride_and_features("MODEL.XCEPTION", output_stride, out_features)
        layout = cfg.MODEL.XCEPTION.LAYOUT
        if layout not in XCEPTION_LAYOUTS:
            raise ValueError(
                f"MODEL.XCEPTION.LAYOUT must be one of {XCEPTION_LAYOUTS}, got {layout!r}"
            )
        super().__init__(
            in_channels=input_shape.channels,
            output_stride=output_stride,
            norm=cfg.MODEL.XCEPTION.NORM,
            out_features=out_features,
            layout=layout,
        )


@BACKBONE_REGISTRY.register()
def build_xception71_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build Xception-71 from ``cfg.MODEL.XCEPTION``.

    Args:
        cfg: Detectron2 config (after :func:`deeperlab_d2.config.add_deeperlab_config`).
        input_shape: input :class:`ShapeSpec`.

    Returns:
        a :class:`D2Xception71` backbone with outputs ``cfg.MODEL.XCEPTION.OUT_FEATURES``.
    """
    return D2Xception71(cfg, input_shape)
