"""DeeperLab decoder and prediction heads (SPEC §1).

The decoder keeps its heavy convolutions at the encoder's stride: the stride-4 low-level feature
is reduced by a 1x1 conv and folded into the encoder grid with space-to-depth, concatenated with
the ASPP output, passed through two large-kernel depthwise-separable convs and unfolded back to
stride 4 with depth-to-space.

The ASPP is this module's own (:class:`ASPP`): its image-pooling branch averages each image
over its valid (unpadded) region only, so that an image's prediction does not depend on the
other images of its batch (Detectron2's ``ASPP`` averages over the whole padded tensor).
"""

from copy import deepcopy
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .blocks import SeparableConv2d, init_conv_weights


def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C * block**2, H / block, W / block] (H, W divisible by ``block``)."""
    return F.pixel_unshuffle(x, block)


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, C * block**2, H, W] -> [N, C, H * block, W * block]; inverse of space_to_depth."""
    return F.pixel_shuffle(x, block)


ValidSizes = Optional[Sequence[Tuple[int, int]]]


def masked_global_avg_pool(x: torch.Tensor, valid_sizes: ValidSizes = None) -> torch.Tensor:
    """Per-image spatial mean over the top-left valid region.

    Args:
        x: [N, C, H, W].
        valid_sizes: (h, w) per image, 1 <= h <= H, 1 <= w <= W: only ``x[n, :, :h, :w]`` is
            averaged. None: the whole map of every image.

    Returns:
        [N, C, 1, 1], accumulated in at least float32 and returned in ``x.dtype``.
    """
    N, _, H, W = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    if valid_sizes is None:
        return x.mean(dim=(2, 3), keepdim=True, dtype=acc).to(x.dtype)
    if len(valid_sizes) != N:
        raise ValueError(f"valid_sizes has {len(valid_sizes)} entries for a batch of {N}")
    pooled = []
    for n, (h, w) in enumerate(valid_sizes):
        h, w = int(h), int(w)
        if not (1 <= h <= H and 1 <= w <= W):
            raise ValueError(f"valid size {(h, w)} of image {n} is outside the map {(H, W)}")
        pooled.append(x[n, :, :h, :w].mean(dim=(1, 2), keepdim=True, dtype=acc))
    return torch.stack(pooled).to(x.dtype)


class _ImagePooling(nn.Sequential):
    """Global average pooling (over the valid region) + 1x1 conv + activation, no norm.

    A ``Sequential`` of ``AdaptiveAvgPool2d(1)`` and the conv, so that parameter names match
    Detectron2's ASPP (``convs.4.1.weight``); :meth:`forward` replaces the pooling module by
    :func:`masked_global_avg_pool` when valid sizes are given.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: nn.Module):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            Conv2d(in_channels, out_channels, 1, bias=True, activation=activation),
        )

    def forward(self, x: torch.Tensor, valid_sizes: ValidSizes = None) -> torch.Tensor:
        pooled = masked_global_avg_pool(x, valid_sizes)
        return self[1](pooled).expand(-1, -1, *x.shape[-2:])


def _xavier_fill(conv: nn.Conv2d) -> None:
    # uniform fan-in init with gain 1 (Caffe2's "XavierFill"), zero bias
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with a padding-aware image-pooling branch.

    Branches: 1x1 conv, one 3x3 conv per dilation, and image pooling (global average + 1x1
    conv, no norm, broadcast back to the map); concatenated, projected by a 1x1 conv, then
    dropout. Same constructor, structure and parameter names as ``detectron2.layers.ASPP``
    (without ``pool_kernel_size``), but :meth:`forward` takes the valid size of each image:
    the image pooling of an image averages only its own valid cells, so padding added to
    batch it with larger images does not change its features.

    Args:
        in_channels, out_channels: channels of the input and of every branch / the output.
        dilations: the dilations of the 3x3 branches (3 in DeepLabV3).
        norm: Detectron2 norm name of every conv except the image-pooling one.
        activation: module applied after every conv (deep-copied).
        dropout: dropout rate on the output (training only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        *,
        norm: str,
        activation: nn.Module,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dropout = dropout
        use_bias = not norm

        def conv(kernel_size: int, dilation: int = 1) -> Conv2d:
            return Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=dilation * (kernel_size // 2),
                dilation=dilation,
                bias=use_bias,
                norm=get_norm(norm, out_channels),
                activation=deepcopy(activation),
            )

        self.convs = nn.ModuleList([conv(1)] + [conv(3, d) for d in dilations])
        self.convs.append(_ImagePooling(in_channels, out_channels, deepcopy(activation)))
        self.project = Conv2d(
            (len(dilations) + 2) * out_channels,
            out_channels,
            1,
            bias=use_bias,
            norm=get_norm(norm, out_channels),
            activation=deepcopy(activation),
        )
        for m in [*self.convs[:-1], self.convs[-1][1], self.project]:
            _xavier_fill(m)

    def forward(self, x: torch.Tensor, valid_sizes: ValidSizes = None) -> torch.Tensor:
        """
        Args:
            x: [N, C, H, W].
            valid_sizes: (h, w) per image, in cells of ``x``: the region of image ``n`` that
                is not padding. None: all of ``x`` is valid.

        Returns:
            [N, out_channels, H, W].
        """
        branches = [conv(x) for conv in self.convs[:-1]]
        branches.append(self.convs[-1](x, valid_sizes))
        out = self.project(torch.cat(branches, dim=1))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, training=self.training)
        return out


def _decoder_aspp(in_channels, channels, dilations, dropout, norm) -> ASPP:
    """The ASPP (ReLU activations) that both decoder layouts start with."""
    return ASPP(
        in_channels, channels, list(dilations), norm=norm, activation=nn.ReLU(), dropout=dropout
    )


def _skip_projection(in_channels: int, out_channels: int, norm: str) -> Conv2d:
    """The 1x1 conv + norm + ReLU that reduces a skip feature before space-to-depth."""
    conv = Conv2d(
        in_channels,
        out_channels,
        1,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=nn.ReLU(),
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class DeeperLabDecoder(nn.Module):
    """ASPP + space-to-depth decoder.

    Args:
        in_channels: channels of the encoder feature (ASPP input).
        low_level_in_channels: channels of the stride-4 low-level feature.
        block_size: encoder stride / low-level stride (4 at output stride 16).
        aspp_channels, aspp_dilations, aspp_dropout: ASPP settings.
        low_level_channels: 1x1 reduction of the low-level feature (32 in the paper).
        mid_level_in_channels, mid_level_channels: an optional second skip from a stride-8
            feature (not in the paper; 0 = none): its 1x1 reduction to ``mid_level_channels`` is
            folded by ``block_size // 2`` to the encoder stride and joins the concatenation,
            like the low-level feature. It brings the deeper stride-8 features of the backbone
            to the decoder, as Panoptic-DeepLab's second skip level does.
        mid_level_feature: the backbone feature name callers pass as ``mid_level`` ("" if none).
        out_channels: channels at stride 4 after depth-to-space (256); the separable convs run
            with ``out_channels * block_size**2`` channels (4096).
        kernel_size: kernel of the two depthwise-separable convs (7).
        norm: Detectron2 norm name.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        low_level_in_channels: int,
        block_size: int,
        aspp_channels: int,
        aspp_dilations,
        aspp_dropout: float,
        low_level_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str,
        mid_level_in_channels: int = 0,
        mid_level_channels: int = 0,
        mid_level_feature: str = "",
    ):
        super().__init__()
        self.block_size = block_size
        self.aspp = _decoder_aspp(in_channels, aspp_channels, aspp_dilations, aspp_dropout, norm)
        self.low_level_proj = _skip_projection(low_level_in_channels, low_level_channels, norm)
        self.mid_level_proj = None
        self.mid_level_feature = ""
        fused = aspp_channels + low_level_channels * block_size**2
        if mid_level_in_channels > 0 and mid_level_channels > 0:
            if block_size % 2:
                raise ValueError(
                    f"decoder: a stride-8 skip needs an even block size, got {block_size}"
                )
            self.mid_level_proj = _skip_projection(mid_level_in_channels, mid_level_channels, norm)
            fused += mid_level_channels * (block_size // 2) ** 2
            self.mid_level_feature = mid_level_feature
        wide = out_channels * block_size**2
        self.fuse = nn.Sequential(
            SeparableConv2d(fused, wide, kernel_size, norm=norm),
            SeparableConv2d(wide, wide, kernel_size, norm=norm),
        )
        init_conv_weights(self.fuse, nonlinearity="relu")
        self.out_channels = out_channels

    def forward(
        self,
        x: torch.Tensor,
        low_level: torch.Tensor,
        valid_sizes: ValidSizes = None,
        mid_level: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: [N, C, H/s, W/s] encoder feature (s = encoder stride).
            low_level: [N, C_low, H/4, W/4].
            valid_sizes: (h, w) per image in cells of ``x``: the part of each image that is
                not batch padding (the ASPP image pooling averages over it). None: all valid.
            mid_level: [N, C_mid, H/8, W/8], required when the decoder has a stride-8 skip
                (``mid_level_channels`` > 0), ignored otherwise.

        Returns:
            [N, out_channels, H/4, W/4].
        """
        x = self.aspp(x, valid_sizes)
        low = space_to_depth(self.low_level_proj(low_level), self.block_size)
        if low.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"decoder: low-level feature {tuple(low_level.shape[-2:])} folded by "
                f"{self.block_size} gives {tuple(low.shape[-2:])}, but the encoder feature is "
                f"{tuple(x.shape[-2:])}; pad the input to a multiple of the encoder stride"
            )
        parts = [x, low]
        if self.mid_level_proj is not None:
            if mid_level is None:
                raise ValueError("decoder: built with a stride-8 skip but got no mid_level")
            mid = space_to_depth(self.mid_level_proj(mid_level), self.block_size // 2)
            if mid.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"decoder: stride-8 feature {tuple(mid_level.shape[-2:])} folded by "
                    f"{self.block_size // 2} gives {tuple(mid.shape[-2:])}, but the encoder "
                    f"feature is {tuple(x.shape[-2:])}"
                )
            parts.append(mid)
        x = self.fuse(torch.cat(parts, dim=1))
        return depth_to_space(x, self.block_size)


class UpsamplingDecoder(nn.Module):
    """ASPP + bilinear upsampling through the skip levels (Panoptic-DeepLab's decoder layout).

    Not DeeperLab's decoder: an option (``DECODER.NAME "upsample"``) for comparing the two
    layouts with everything else equal. The ASPP output at the encoder stride is upsampled 2x
    at a time to each skip level (stride 8 if ``mid_level_channels`` > 0, then stride 4),
    concatenated with the skip feature's 1x1 reduction and fused by one KxK
    depthwise-separable conv to ``out_channels``, so that the last convs run at stride 4
    (DeeperLab runs its convs at the encoder stride on space-to-depth features instead).

    Args: as :class:`DeeperLabDecoder`; ``block_size`` is the encoder stride / 4 (the total
    upsampling). With a stride-8 skip the encoder stride must be 16 or more.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        low_level_in_channels: int,
        block_size: int,
        aspp_channels: int,
        aspp_dilations,
        aspp_dropout: float,
        low_level_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str,
        mid_level_in_channels: int = 0,
        mid_level_channels: int = 0,
        mid_level_feature: str = "",
    ):
        super().__init__()
        self.block_size = block_size
        self.aspp = _decoder_aspp(in_channels, aspp_channels, aspp_dilations, aspp_dropout, norm)
        width = aspp_channels
        self.mid_level_proj = self.mid_level_fuse = None
        self.mid_level_feature = ""
        if mid_level_in_channels > 0 and mid_level_channels > 0:
            if block_size < 4 or block_size % 2:
                raise ValueError(
                    f"decoder: a stride-8 skip needs an encoder stride of at least 16, got "
                    f"{4 * block_size}"
                )
            self.mid_level_proj = _skip_projection(mid_level_in_channels, mid_level_channels, norm)
            self.mid_level_fuse = SeparableConv2d(
                width + mid_level_channels, out_channels, kernel_size, norm=norm
            )
            init_conv_weights(self.mid_level_fuse, nonlinearity="relu")
            self.mid_level_feature = mid_level_feature
            width = out_channels
        self.low_level_proj = _skip_projection(low_level_in_channels, low_level_channels, norm)
        self.low_level_fuse = SeparableConv2d(
            width + low_level_channels, out_channels, kernel_size, norm=norm
        )
        init_conv_weights(self.low_level_fuse, nonlinearity="relu")
        self.out_channels = out_channels

    @staticmethod
    def _merge(x, skip, proj, fuse, factor, name):
        size = (x.shape[-2] * factor, x.shape[-1] * factor)
        if tuple(skip.shape[-2:]) != size:
            raise ValueError(
                f"decoder: {name} feature {tuple(skip.shape[-2:])} is not {factor}x the "
                f"coarser decoder feature {tuple(x.shape[-2:])}; pad the input to a multiple "
                f"of the encoder stride"
            )
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return fuse(torch.cat([x, proj(skip)], dim=1))

    def forward(
        self,
        x: torch.Tensor,
        low_level: torch.Tensor,
        valid_sizes: ValidSizes = None,
        mid_level: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Same inputs and output as :meth:`DeeperLabDecoder.forward`."""
        x = self.aspp(x, valid_sizes)
        factor = self.block_size
        if self.mid_level_proj is not None:
            if mid_level is None:
                raise ValueError("decoder: built with a stride-8 skip but got no mid_level")
            x = self._merge(
                x, mid_level, self.mid_level_proj, self.mid_level_fuse, factor // 2, "stride-8"
            )
            factor = 2
        return self._merge(
            x, low_level, self.low_level_proj, self.low_level_fuse, factor, "low-level"
        )


class PredictionHead(nn.Module):
    """KxK depthwise-separable conv + norm + ReLU, then a 1x1 conv to ``out_channels``."""

    def __init__(
        self,
        in_channels: int,
        head_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str,
        bias_init: Optional[float] = None,
    ):
        super().__init__()
        self.tower = SeparableConv2d(in_channels, head_channels, kernel_size, norm=norm)
        init_conv_weights(self.tower, nonlinearity="relu")
        self.predictor = nn.Conv2d(head_channels, out_channels, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0 if bias_init is None else bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.tower(x))


def build_deeperlab_decoder(cfg, backbone_shapes) -> nn.Module:
    """The decoder of ``MODEL.DEEPERLAB.*`` on a backbone's outputs: DeeperLab's ASPP +
    space-to-depth decoder, or with ``DECODER.NAME "upsample"`` the :class:`UpsamplingDecoder`.

    Args:
        cfg: a Detectron2 config with the DeeperLab keys.
        backbone_shapes: ``backbone.output_shape()``.

    Raises:
        ValueError: naming the key, if ``IN_FEATURE`` / ``LOW_LEVEL_FEATURE`` are not backbone
            outputs, the low-level stride is not 4, or the strides do not divide.
    """
    c = cfg.MODEL.DEEPERLAB
    if c.DECODER.NAME not in ("space_to_depth", "upsample"):
        raise ValueError(
            f"MODEL.DEEPERLAB.DECODER.NAME must be 'space_to_depth' or 'upsample', "
            f"got {c.DECODER.NAME!r}"
        )
    named = [("IN_FEATURE", c.IN_FEATURE), ("LOW_LEVEL_FEATURE", c.LOW_LEVEL_FEATURE)]
    if c.DECODER.MID_LEVEL_FEATURE:
        named.append(("DECODER.MID_LEVEL_FEATURE", c.DECODER.MID_LEVEL_FEATURE))
    for key, name in named:
        if name not in backbone_shapes:
            raise ValueError(
                f"MODEL.DEEPERLAB.{key} = {name!r} is not an output of backbone "
                f"{cfg.MODEL.BACKBONE.NAME} (it gives {sorted(backbone_shapes)})"
            )
    high, low = backbone_shapes[c.IN_FEATURE], backbone_shapes[c.LOW_LEVEL_FEATURE]
    if high.stride % low.stride != 0:
        raise ValueError(
            f"stride of MODEL.DEEPERLAB.IN_FEATURE ({high.stride}) must be a multiple of the "
            f"stride of MODEL.DEEPERLAB.LOW_LEVEL_FEATURE ({low.stride})"
        )
    if low.stride != 4:
        raise ValueError(
            f"MODEL.DEEPERLAB.LOW_LEVEL_FEATURE must have stride 4, {c.LOW_LEVEL_FEATURE!r} "
            f"has stride {low.stride}"
        )
    mid_in = 0
    if c.DECODER.MID_LEVEL_FEATURE:
        mid = backbone_shapes[c.DECODER.MID_LEVEL_FEATURE]
        if mid.stride != 8 or high.stride % 16 != 0:
            raise ValueError(
                f"MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE must have stride 8 and "
                f"IN_FEATURE a stride that is a multiple of 16; {c.DECODER.MID_LEVEL_FEATURE!r} "
                f"has stride {mid.stride}, {c.IN_FEATURE!r} {high.stride}"
            )
        if c.DECODER.MID_LEVEL_CHANNELS <= 0:
            raise ValueError(
                "MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS must be > 0 when "
                f"DECODER.MID_LEVEL_FEATURE is set, got {c.DECODER.MID_LEVEL_CHANNELS}"
            )
        mid_in = mid.channels
    decoders = {"space_to_depth": DeeperLabDecoder, "upsample": UpsamplingDecoder}
    return decoders[c.DECODER.NAME](
        in_channels=high.channels,
        low_level_in_channels=low.channels,
        block_size=high.stride // low.stride,
        aspp_channels=c.ASPP.CHANNELS,
        aspp_dilations=c.ASPP.DILATIONS,
        aspp_dropout=c.ASPP.DROPOUT,
        low_level_channels=c.DECODER.LOW_LEVEL_CHANNELS,
        out_channels=c.DECODER.OUT_CHANNELS,
        kernel_size=c.DECODER.KERNEL_SIZE,
        norm=c.NORM,
        mid_level_in_channels=mid_in,
        mid_level_channels=c.DECODER.MID_LEVEL_CHANNELS if mid_in else 0,
        mid_level_feature=c.DECODER.MID_LEVEL_FEATURE,
    )
