"""Modeling: backbones, decoder, instance branches, losses and the DeeperLab meta-architecture."""

from .backbone import build_mobilenetv2_backbone, build_xception71_backbone  # noqa: F401
from .decoder import (
    DeeperLabDecoder,
    PredictionHead,
    build_deeperlab_decoder,
    depth_to_space,
    space_to_depth,
)
from .instance_branches import (
    INSTANCE_BRANCHES_REGISTRY,
    CenterBranch,
    InstanceBranch,
    KeypointBranch,
    build_instance_branch,
    get_instance_branch_class,
)
from .losses import (
    masked_l1_loss,
    weighted_bootstrapped_cross_entropy,
    weighted_mse_loss,
    weighted_sigmoid_cross_entropy,
)
from .meta_arch import DeeperLab
