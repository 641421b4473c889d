"""Instance representations of the DeeperLab meta-architecture, as a registry.

The meta-architecture keeps the backbone, the shared decoder, the semantic head, the semantic
loss and the fusion of semantic and instance results. Everything about *instances* lives in an
instance branch chosen by ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION``:

* ``"keypoints"`` (:class:`KeypointBranch`): DeeperLab's five keypoints per instance, their
  heatmaps and short-, middle- and long-range offsets, decoded by Hough voting (SPEC §1-4);
* ``"center"`` (:class:`CenterBranch`): Panoptic-DeepLab's center heatmap and center offsets,
  decoded by nearest center (SPEC §5).

A branch owns its heads, its target generator (built by :meth:`InstanceBranch.
target_generator_from_config`, used by the dataset mapper), the padding values of its targets,
its losses (``loss_*`` keys) and its inference ``(head outputs, semantic) -> instance map +
scores`` (:meth:`InstanceBranch.instance_inference`, called through
:func:`deeperlab_d2.layers.post_processing.panoptic_inference`, which does the fusion).

To add a representation: subclass :class:`InstanceBranch`, set ``representation``, register it
with ``@INSTANCE_BRANCHES_REGISTRY.register()`` and select it by its ``representation`` name.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from ..config import post_process_config
from ..data.center_target_generator import CenterTargetGenerator
from ..data.target_generator import DeeperLabTargetGenerator
from ..layers.center_post_processing import CenterPostProcessConfig, center_instances
from ..layers.keypoints import KEYPOINT_EDGES, NUM_EDGES, NUM_KEYPOINTS
from ..layers.post_processing import PostProcessConfig, deeperlab_instances
from .decoder import PredictionHead, build_deeperlab_decoder
from .losses import masked_l1_loss, weighted_mse_loss, weighted_sigmoid_cross_entropy

__all__ = [
    "INSTANCE_BRANCHES_REGISTRY",
    "CenterBranch",
    "InstanceBranch",
    "KeypointBranch",
    "build_instance_branch",
    "get_instance_branch_class",
]

INSTANCE_BRANCHES_REGISTRY = Registry("DEEPERLAB_INSTANCE_BRANCHES")
INSTANCE_BRANCHES_REGISTRY.__doc__ = """
Registry of the instance branches of the DeeperLab meta-architecture (instance
representations). A registered class is a subclass of :class:`InstanceBranch`; it is selected
by its ``representation`` attribute, the value of ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION``,
and built as ``cls(cfg, in_channels=..., backbone_shapes=...)`` (``@configurable``).
"""


def get_instance_branch_class(cfg):
    """The registered :class:`InstanceBranch` subclass named by
    ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION``."""
    name = cfg.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION
    known = {cls.representation: cls for _, cls in INSTANCE_BRANCHES_REGISTRY}
    if name not in known:
        raise ValueError(
            f"config key MODEL.DEEPERLAB.INSTANCE_REPRESENTATION must be one of {sorted(known)} "
            f"(the instance branches registered in INSTANCE_BRANCHES_REGISTRY), got {name!r}"
        )
    return known[name]


def build_instance_branch(cfg, in_channels: int, backbone_shapes) -> "InstanceBranch":
    """Build the instance branch of ``cfg`` on the shared decoder's ``in_channels``."""
    return get_instance_branch_class(cfg)(
        cfg, in_channels=in_channels, backbone_shapes=backbone_shapes
    )


def _upsample(t: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of [N, C, h, w] or of offset fields [N, K, 2, h, w]."""
    if t.dim() == 5:
        n, k = t.shape[:2]
        up = F.interpolate(t.flatten(1, 2), size=size, mode="bilinear", align_corners=False)
        return up.view(n, k, 2, *size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


class InstanceBranch(nn.Module):
    """Interface of an instance representation (see the module docstring).

    Class attributes:
        representation: the ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION`` value that selects it.
        target_pad_values: every target tensor its target generator adds to a dataset dict
            (besides ``sem_seg`` / ``sem_seg_weights``), with the value batch padding gets.
        output_names: names of its head outputs, as :meth:`forward` returns them.
    """

    representation: str = ""
    target_pad_values: Dict[str, float] = {}
    output_names: Tuple[str, ...] = ()

    #: thresholds of its inference; has ``thing_area`` and ``stuff_area`` for the fusion
    post_process: object

    def __init__(self):
        super().__init__()
        # the branch's own ASPP + decoder (MODEL.DEEPERLAB.DUAL_DECODER), or None: its heads
        # take the shared decoder's output (see set_decoder)
        self.set_decoder(None, "", "")

    @staticmethod
    def own_decoder_from_config(cfg, in_channels: int, backbone_shapes) -> dict:
        """``decoder``, ``in_feature``, ``low_level_feature`` and ``in_channels`` (the
        channels the heads see) constructor arguments for ``MODEL.DEEPERLAB.DUAL_DECODER``."""
        c = cfg.MODEL.DEEPERLAB
        decoder = None
        if c.DUAL_DECODER:
            if backbone_shapes is None:
                raise ValueError("MODEL.DEEPERLAB.DUAL_DECODER needs the backbone's shapes")
            decoder = build_deeperlab_decoder(cfg, backbone_shapes)
            in_channels = decoder.out_channels
        return {
            "in_channels": in_channels,
            "decoder": decoder,
            "in_feature": c.IN_FEATURE,
            "low_level_feature": c.LOW_LEVEL_FEATURE,
        }

    def set_decoder(self, decoder: Optional[nn.Module], in_feature: str, low_level_feature: str):
        """Keep the branch's own decoder (None: heads on the shared decoder's output)."""
        self.decoder = decoder
        self.in_feature, self.low_level_feature = in_feature, low_level_feature

    def head_input(self, x: torch.Tensor, features: Dict[str, torch.Tensor], valid_sizes=None):
        """What the heads see: ``x``, the shared decoder's output, or with an own decoder its
        output on the backbone ``features``."""
        if self.decoder is None:
            return x
        return self.decoder(
            features[self.in_feature],
            features[self.low_level_feature],
            valid_sizes,
            features.get(self.decoder.mid_level_feature),
        )

    @classmethod
    def target_generator_from_config(cls, cfg, thing_ids: Sequence[int]):
        """The callable ``(panoptic ids [H, W], segments_info) -> dict of target tensors``."""
        raise NotImplementedError

    @staticmethod
    def ideal_outputs(targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The head outputs (batch of one, ``output_names``) a perfect model would give for
        one image's targets (as made by its target generator): the oracle's inputs."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        features: Dict[str, torch.Tensor],
        size: Tuple[int, int],
        valid_sizes=None,
    ) -> Dict[str, torch.Tensor]:
        """Head outputs at the input resolution ``size`` from the shared decoder output ``x``
        [N, C, H/4, W/4] (``features``: the backbone's, for branches with their own decoder;
        ``valid_sizes``: per image, the encoder cells that are not batch padding)."""
        raise NotImplementedError

    def losses(
        self, outputs: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Scalar ``loss_*`` tensors from the head outputs and the padded, stacked targets."""
        raise NotImplementedError

    def instance_inference(
        self,
        sem_seg_logits: torch.Tensor,
        semantic: torch.Tensor,
        thing_mask: torch.Tensor,
        return_maps: bool = False,
        **outputs: torch.Tensor,
    ) -> List[Dict[str, torch.Tensor]]:
        """Per image ``instance_map`` [H, W] int64 (-1 = none) and ``instance_scores`` [J]
        from float32 head outputs of one valid size (an ``instance_fn`` of
        :func:`~deeperlab_d2.layers.post_processing.panoptic_inference`); with
        ``return_maps``, also the intermediate maps a debugging picture draws."""
        raise NotImplementedError


@INSTANCE_BRANCHES_REGISTRY.register()
class KeypointBranch(InstanceBranch):
    """DeeperLab's keypoint representation: heatmap (P = 5 keypoints), short- and long-range
    offsets (P fields) and middle-range offsets (E = 8 edges) heads, each a KxK separable conv +
    norm + ReLU and a 1x1 conv on the shared decoder output (with
    ``MODEL.DEEPERLAB.DUAL_DECODER``, on the branch's own ASPP + decoder); sigmoid CE and
    masked L1 losses; Hough-voting inference
    (:func:`~deeperlab_d2.layers.post_processing.deeperlab_instances`).

    Outputs: ``heatmap`` [N, P, H, W] logits; ``short_offsets`` / ``long_offsets``
    [N, P, 2, H, W] and ``mid_offsets`` [N, E, 2, H, W], (dy, dx) in input pixels.
    """

    representation = "keypoints"
    target_pad_values = {
        "heatmap": 0.0,
        "heatmap_weights": 0.0,
        "short_offsets": 0.0,
        "mid_offsets": 0.0,
        "long_offsets": 0.0,
        "long_offset_weights": 0.0,
    }
    output_names = ("heatmap", "short_offsets", "mid_offsets", "long_offsets")

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        head_channels: int,
        kernel_size: int,
        norm: str,
        offset_normalizer: float,
        heatmap_loss_weight: float,
        short_offset_loss_weight: float,
        mid_offset_loss_weight: float,
        long_offset_loss_weight: float,
        post_process: PostProcessConfig,
        heatmap_prior: float = 0.01,
        heatmap_focal_gamma: float = 0.0,
        decoder: Optional[nn.Module] = None,
        in_feature: str = "",
        low_level_feature: str = "",
    ):
        """
        Args:
            in_channels: channels of the shared decoder output.
            head_channels, kernel_size, norm: the heads' tower.
            offset_normalizer: the offset heads predict offsets divided by it; outputs are
                multiplied back to pixels and the L1 losses compare offsets divided by it.
            *_loss_weight: loss weights.
            post_process: thresholds of the inference.
            heatmap_prior: initial heatmap probability (bias of the last conv).
            heatmap_focal_gamma: focal exponent of the heatmap's sigmoid CE (0 = plain).
            decoder: the branch's own ASPP + decoder (dual layout), or None (shared decoder).
            in_feature, low_level_feature: the backbone features the own decoder takes.
        """
        super().__init__()
        self.set_decoder(decoder, in_feature, low_level_feature)
        prior = float(torch.logit(torch.tensor(heatmap_prior)))

        def head(out, bias_init=None):
            return PredictionHead(in_channels, head_channels, out, kernel_size, norm, bias_init)

        self.heatmap = head(NUM_KEYPOINTS, prior)
        self.long_offsets = head(2 * NUM_KEYPOINTS)
        self.short_offsets = head(2 * NUM_KEYPOINTS)
        self.mid_offsets = head(2 * NUM_EDGES)
        self.offset_normalizer = offset_normalizer
        self.heatmap_loss_weight = heatmap_loss_weight
        self.heatmap_focal_gamma = heatmap_focal_gamma
        self.short_offset_loss_weight = short_offset_loss_weight
        self.mid_offset_loss_weight = mid_offset_loss_weight
        self.long_offset_loss_weight = long_offset_loss_weight
        self.post_process = post_process

    @classmethod
    def from_config(cls, cfg, in_channels: int, backbone_shapes=None):
        c = cfg.MODEL.DEEPERLAB
        return {
            **cls.own_decoder_from_config(cfg, in_channels, backbone_shapes),
            "head_channels": c.INSTANCE_HEAD_CHANNELS,
            "kernel_size": c.HEAD_KERNEL_SIZE,
            "norm": c.NORM,
            "offset_normalizer": c.LOSS.OFFSET_NORMALIZER,
            "heatmap_loss_weight": c.LOSS.HEATMAP_WEIGHT,
            "heatmap_focal_gamma": c.LOSS.HEATMAP_FOCAL_GAMMA,
            "short_offset_loss_weight": c.LOSS.SHORT_OFFSET_WEIGHT,
            "mid_offset_loss_weight": c.LOSS.MID_OFFSET_WEIGHT,
            "long_offset_loss_weight": c.LOSS.LONG_OFFSET_WEIGHT,
            "post_process": post_process_config(cfg),
        }

    @classmethod
    def target_generator_from_config(cls, cfg, thing_ids: Sequence[int]):
        t = cfg.MODEL.DEEPERLAB.TARGETS
        return DeeperLabTargetGenerator(
            ignore_label=cfg.MODEL.DEEPERLAB.IGNORE_VALUE,
            thing_ids=list(thing_ids),
            keypoint_radius=t.KEYPOINT_RADIUS,
            small_instance_area=t.SMALL_INSTANCE_AREA,
            small_instance_weight=t.SMALL_INSTANCE_WEIGHT,
            ignore_void_in_heatmap=t.IGNORE_VOID_IN_HEATMAP,
        )

    def forward(self, x, features, size, valid_sizes=None):
        x = self.head_input(x, features, valid_sizes)
        n, _, h, w = x.shape
        P, E = NUM_KEYPOINTS, NUM_EDGES
        raw = {
            "heatmap": self.heatmap(x),
            "short_offsets": self.short_offsets(x).view(n, P, 2, h, w),
            "mid_offsets": self.mid_offsets(x).view(n, E, 2, h, w),
            "long_offsets": self.long_offsets(x).view(n, P, 2, h, w),
        }
        out = {k: _upsample(v, size) for k, v in raw.items()}
        for k in ("short_offsets", "mid_offsets", "long_offsets"):
            out[k] = out[k] * self.offset_normalizer
        return out

    @staticmethod
    def ideal_outputs(targets):
        return {
            "heatmap": torch.where(targets["heatmap"] > 0, 10.0, -10.0)[None],  # logits
            "short_offsets": targets["short_offsets"][None],
            "mid_offsets": targets["mid_offsets"][None],
            "long_offsets": targets["long_offsets"][None],
        }

    def losses(self, outputs, targets):
        heat_mask = targets["heatmap"]  # the disks also mask short- and mid-range offsets
        edge_sources = [src for src, _ in KEYPOINT_EDGES]
        norm = self.offset_normalizer
        return {
            "loss_heatmap": self.heatmap_loss_weight
            * weighted_sigmoid_cross_entropy(
                outputs["heatmap"],
                targets["heatmap"],
                targets["heatmap_weights"],
                self.heatmap_focal_gamma,
            ),
            "loss_short_offset": self.short_offset_loss_weight
            * masked_l1_loss(outputs["short_offsets"], targets["short_offsets"], heat_mask, norm),
            "loss_mid_offset": self.mid_offset_loss_weight
            * masked_l1_loss(
                outputs["mid_offsets"], targets["mid_offsets"], heat_mask[:, edge_sources], norm
            ),
            "loss_long_offset": self.long_offset_loss_weight
            * masked_l1_loss(
                outputs["long_offsets"],
                targets["long_offsets"],
                targets["long_offset_weights"],
                norm,
            ),
        }

    def instance_inference(
        self, sem_seg_logits, semantic, thing_mask, return_maps=False, **outputs
    ):
        return deeperlab_instances(
            sem_seg_logits,
            semantic,
            thing_mask,
            heatmap_logits=outputs["heatmap"],
            short_offsets=outputs["short_offsets"],
            mid_offsets=outputs["mid_offsets"],
            long_offsets=outputs["long_offsets"],
            cfg=self.post_process,
            return_maps=return_maps,
        )


def center_post_process_config(cfg) -> CenterPostProcessConfig:
    """The :class:`CenterPostProcessConfig` of a cfg (``MODEL.DEEPERLAB.CENTER.*`` and the
    fusion's ``POST_PROCESS.THING_AREA`` / ``STUFF_AREA``)."""
    c, p = cfg.MODEL.DEEPERLAB.CENTER, cfg.MODEL.DEEPERLAB.POST_PROCESS
    return CenterPostProcessConfig(
        center_threshold=c.THRESHOLD,
        nms_kernel=c.NMS_KERNEL,
        top_k=c.TOP_K,
        thing_area=p.THING_AREA,
        stuff_area=p.STUFF_AREA,
    )


@INSTANCE_BRANCHES_REGISTRY.register()
class CenterBranch(InstanceBranch):
    """Panoptic-DeepLab's center representation (Cheng et al., 2020): a center heatmap head
    (1 channel, regressed with MSE to Gaussians of std ``sigma`` at the instances' centers of
    mass) and a center offset head (2 channels, (dy, dx) from each thing pixel to its center,
    L1); inference keeps heatmap peaks (threshold, max-pool NMS, top-k) and gives each thing
    pixel to the nearest predicted center
    (:func:`~deeperlab_d2.layers.center_post_processing.center_instances`).

    With ``MODEL.DEEPERLAB.DUAL_DECODER`` the heads sit on their own ASPP + decoder fed by the
    backbone (Panoptic-DeepLab's dual-ASPP / dual-decoder layout), else on the shared decoder.

    Outputs: ``center_heatmap`` [N, 1, H, W]; ``center_offsets`` [N, 1, 2, H, W] (dy, dx) in
    input pixels.
    """

    representation = "center"
    target_pad_values = {
        "center_heatmap": 0.0,
        "center_weights": 0.0,
        "center_offsets": 0.0,
        "center_offset_weights": 0.0,
    }
    output_names = ("center_heatmap", "center_offsets")

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        head_channels: int,
        kernel_size: int,
        norm: str,
        heatmap_loss_weight: float,
        offset_loss_weight: float,
        post_process: CenterPostProcessConfig,
        decoder: Optional[nn.Module] = None,
        in_feature: str = "",
        low_level_feature: str = "",
    ):
        """
        Args:
            in_channels: channels of the decoder output the heads see.
            head_channels, kernel_size, norm: the heads' tower.
            heatmap_loss_weight, offset_loss_weight: MSE and L1 loss weights (200, 0.01).
            post_process: thresholds of the inference.
            decoder: the branch's own ASPP + decoder (dual layout), or None (shared decoder).
            in_feature, low_level_feature: the backbone features the own decoder takes.
        """
        super().__init__()
        self.set_decoder(decoder, in_feature, low_level_feature)
        self.center_heatmap = PredictionHead(in_channels, head_channels, 1, kernel_size, norm)
        self.center_offsets = PredictionHead(in_channels, head_channels, 2, kernel_size, norm)
        self.heatmap_loss_weight = heatmap_loss_weight
        self.offset_loss_weight = offset_loss_weight
        self.post_process = post_process

    @classmethod
    def from_config(cls, cfg, in_channels: int, backbone_shapes=None):
        c = cfg.MODEL.DEEPERLAB
        return {
            **cls.own_decoder_from_config(cfg, in_channels, backbone_shapes),
            "head_channels": c.INSTANCE_HEAD_CHANNELS,
            "kernel_size": c.HEAD_KERNEL_SIZE,
            "norm": c.NORM,
            "heatmap_loss_weight": c.CENTER.HEATMAP_LOSS_WEIGHT,
            "offset_loss_weight": c.CENTER.OFFSET_LOSS_WEIGHT,
            "post_process": center_post_process_config(cfg),
        }

    @classmethod
    def target_generator_from_config(cls, cfg, thing_ids: Sequence[int]):
        c = cfg.MODEL.DEEPERLAB
        return CenterTargetGenerator(
            ignore_label=c.IGNORE_VALUE,
            thing_ids=list(thing_ids),
            sigma=c.CENTER.SIGMA,
            small_instance_area=c.TARGETS.SMALL_INSTANCE_AREA,
            small_instance_weight=c.TARGETS.SMALL_INSTANCE_WEIGHT,
        )

    def forward(self, x, features, size, valid_sizes=None):
        x = self.head_input(x, features, valid_sizes)
        n, _, h, w = x.shape
        return {
            "center_heatmap": _upsample(self.center_heatmap(x), size),
            "center_offsets": _upsample(self.center_offsets(x).view(n, 1, 2, h, w), size),
        }

    @staticmethod
    def ideal_outputs(targets):
        return {
            "center_heatmap": targets["center_heatmap"][None],
            "center_offsets": targets["center_offsets"][None, None],
        }

    def losses(self, outputs, targets):
        return {
            "loss_center_heatmap": self.heatmap_loss_weight
            * weighted_mse_loss(
                outputs["center_heatmap"], targets["center_heatmap"], targets["center_weights"]
            ),
            "loss_center_offset": self.offset_loss_weight
            * masked_l1_loss(
                outputs["center_offsets"],
                targets["center_offsets"][:, None],
                targets["center_offset_weights"],
            ),
        }

    def instance_inference(
        self, sem_seg_logits, semantic, thing_mask, return_maps=False, **outputs
    ):
        # the center heatmap and the centers (``instance_centers``) are the pictures' maps
        return center_instances(
            sem_seg_logits,
            semantic,
            thing_mask,
            center_heatmap=outputs["center_heatmap"],
            center_offsets=outputs["center_offsets"][:, 0],
            cfg=self.post_process,
        )
