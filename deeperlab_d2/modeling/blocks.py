"""Building blocks shared by the backbones, the decoder and the heads."""

import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn

__all__ = ["SeparableConv2d", "init_conv_weights", "same_padding"]


def same_padding(kernel_size: int, dilation: int) -> int:
    """Symmetric padding keeping ``ceil(H / stride)`` outputs for odd kernels (TF "SAME" when
    the input is divisible by the stride)."""
    return dilation * (kernel_size - 1) // 2


class SeparableConv2d(nn.Module):
    """Depthwise KxK conv + norm + ReLU, then pointwise 1x1 conv + norm (+ ReLU): the one
    depthwise-separable conv of the package (Xception-71, the decoder and the heads).

    Args:
        in_channels: input channels.
        out_channels: output channels of the pointwise conv.
        kernel_size: depthwise kernel size (odd).
        stride: stride of the depthwise conv.
        dilation: dilation of the depthwise conv.
        norm: Detectron2 norm name (see :func:`detectron2.layers.get_norm`); "" = no norm, the
            convs then have a bias.
        last_activation: whether to apply ReLU after the pointwise norm (Xception's blocks with
            a shortcut apply it after the residual sum instead).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: str = "BN",
        last_activation: bool = True,
    ):
        super().__init__()
        self.depthwise = Conv2d(
            in_channels,
            in_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=same_padding(kernel_size, dilation),
            dilation=dilation,
            groups=in_channels,
            bias=not norm,
            norm=get_norm(norm, in_channels),
            activation=nn.ReLU(inplace=True),
        )
        self.pointwise = Conv2d(
            in_channels,
            out_channels,
            kernel_size=1,
            bias=not norm,
            norm=get_norm(norm, out_channels),
            activation=nn.ReLU(inplace=True) if last_activation else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_channels, H, W] -> [N, out_channels, H', W']."""
        return self.pointwise(self.depthwise(x))


def init_conv_weights(module: nn.Module, **kaiming_kwargs) -> None:
    """He (fan-out) init of every conv of ``module``, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", **kaiming_kwargs)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
