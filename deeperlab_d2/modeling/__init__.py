"""Modeling: backbones, decoder, heads, losses and the DeeperLab meta-architecture."""

from .backbone import build_mobilenetv2_backbone, build_xception71_backbone  # noqa: F401
from .decoder import DeeperLabDecoder, DeeperLabHeads, depth_to_space, space_to_depth
from .losses import (
    masked_l1_loss,
    weighted_bootstrapped_cross_entropy,
    weighted_sigmoid_cross_entropy,
)
from .meta_arch import DeeperLab
