"""DeeperLab decoder and prediction heads (SPEC §1).

The decoder keeps its heavy convolutions at the encoder's stride: the stride-4 low-level feature
is reduced by a 1x1 conv and folded into the encoder grid with space-to-depth, concatenated with
the ASPP output, passed through two large-kernel depthwise-separable convs and unfolded back to
stride 4 with depth-to-space.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import ASPP, Conv2d, get_norm
from torch import nn


def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C * block**2, H / block, W / block] (H, W divisible by ``block``)."""
    return F.pixel_unshuffle(x, block)


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, C * block**2, H, W] -> [N, C, H * block, W * block]; inverse of space_to_depth."""
    return F.pixel_shuffle(x, block)


class SeparableConv2d(nn.Sequential):
    """KxK depthwise conv + norm + ReLU, then 1x1 pointwise conv + norm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str):
        super().__init__(
            Conv2d(
                in_channels,
                in_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=not norm,
                norm=get_norm(norm, in_channels),
                activation=nn.ReLU(),
            ),
            Conv2d(
                in_channels,
                out_channels,
                1,
                bias=not norm,
                norm=get_norm(norm, out_channels),
                activation=nn.ReLU(),
            ),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class DeeperLabDecoder(nn.Module):
    """ASPP + space-to-depth decoder.

    Args:
        in_channels: channels of the encoder feature (ASPP input).
        low_level_in_channels: channels of the stride-4 low-level feature.
        block_size: encoder stride / low-level stride (4 at output stride 16).
        aspp_channels, aspp_dilations, aspp_dropout: ASPP settings.
        low_level_channels: 1x1 reduction of the low-level feature (32 in the paper).
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
    ):
        super().__init__()
        self.block_size = block_size
        self.aspp = ASPP(
            in_channels,
            aspp_channels,
            list(aspp_dilations),
            norm=norm,
            activation=nn.ReLU(),
            dropout=aspp_dropout,
        )
        self.low_level_proj = Conv2d(
            low_level_in_channels,
            low_level_channels,
            1,
            bias=not norm,
            norm=get_norm(norm, low_level_channels),
            activation=nn.ReLU(),
        )
        nn.init.kaiming_normal_(self.low_level_proj.weight, mode="fan_out", nonlinearity="relu")
        wide = out_channels * block_size**2
        fused = aspp_channels + low_level_channels * block_size**2
        self.fuse = nn.Sequential(
            SeparableConv2d(fused, wide, kernel_size, norm),
            SeparableConv2d(wide, wide, kernel_size, norm),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [N, C, H/s, W/s] encoder feature (s = encoder stride).
            low_level: [N, C_low, H/4, W/4].

        Returns:
            [N, out_channels, H/4, W/4].
        """
        x = self.aspp(x)
        low = space_to_depth(self.low_level_proj(low_level), self.block_size)
        if low.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"decoder: low-level feature {tuple(low_level.shape[-2:])} folded by "
                f"{self.block_size} gives {tuple(low.shape[-2:])}, but the encoder feature is "
                f"{tuple(x.shape[-2:])}; pad the input to a multiple of the encoder stride"
            )
        x = self.fuse(torch.cat([x, low], dim=1))
        return depth_to_space(x, self.block_size)


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
        self.tower = SeparableConv2d(in_channels, head_channels, kernel_size, norm)
        self.predictor = nn.Conv2d(head_channels, out_channels, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0 if bias_init is None else bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.tower(x))


class DeeperLabHeads(nn.Module):
    """The five heads on the shared stride-4 feature.

    ``forward`` returns (at stride 4, channels first):

    * ``sem_seg``: [N, C, h, w] logits;
    * ``heatmap``: [N, P, h, w] logits;
    * ``short_offsets`` / ``long_offsets``: [N, P, 2, h, w], (dy, dx) in input pixels;
    * ``mid_offsets``: [N, E, 2, h, w], (dy, dx) in input pixels.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_keypoints: int,
        num_edges: int,
        sem_seg_channels: int,
        instance_channels: int,
        kernel_size: int,
        norm: str,
        heatmap_prior: float = 0.01,
    ):
        super().__init__()
        self.num_keypoints, self.num_edges = num_keypoints, num_edges
        prior_logit = float(torch.logit(torch.tensor(heatmap_prior)))

        def head(ch, out, bias_init=None):
            return PredictionHead(in_channels, ch, out, kernel_size, norm, bias_init)

        self.sem_seg = head(sem_seg_channels, num_classes)
        self.heatmap = head(instance_channels, num_keypoints, prior_logit)
        self.long_offsets = head(instance_channels, 2 * num_keypoints)
        self.short_offsets = head(instance_channels, 2 * num_keypoints)
        self.mid_offsets = head(instance_channels, 2 * num_edges)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        P, E = self.num_keypoints, self.num_edges
        return {
            "sem_seg": self.sem_seg(x),
            "heatmap": self.heatmap(x),
            "short_offsets": self.short_offsets(x).view(n, P, 2, h, w),
            "mid_offsets": self.mid_offsets(x).view(n, E, 2, h, w),
            "long_offsets": self.long_offsets(x).view(n, P, 2, h, w),
        }
