"""The DeeperLab meta-architecture (SPEC §1-3)."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ..config import check_deeperlab_config, check_num_classes, post_process_config
from ..data.target_generator import KEYPOINT_EDGES, NUM_EDGES, NUM_KEYPOINTS
from ..layers.post_processing import (
    PostProcessConfig,
    deeperlab_panoptic_inference,
    mask_nonfinite_logits,
)
from .decoder import DeeperLabDecoder, DeeperLabHeads
from .losses import (
    masked_l1_loss,
    weighted_bootstrapped_cross_entropy,
    weighted_sigmoid_cross_entropy,
)

# Target tensors the dataset mapper adds to each dataset dict, with their padding values.
TARGET_PAD_VALUES = {
    "sem_seg": None,  # the ignore value
    "sem_seg_weights": 0.0,
    "heatmap": 0.0,
    "heatmap_weights": 0.0,
    "short_offsets": 0.0,
    "mid_offsets": 0.0,
    "long_offsets": 0.0,
    "long_offset_weights": 0.0,
}


def pad_and_stack(tensors: Sequence[torch.Tensor], size, value: float) -> torch.Tensor:
    """Stack tensors [..., h_i, w_i] into [N, ..., H, W], padding bottom/right with ``value``."""
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], *size), value)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]].copy_(t)
    return out


@META_ARCH_REGISTRY.register()
class DeeperLab(nn.Module):
    """DeeperLab: single-shot panoptic image parser (Yang et al., 2019).

    Backbone -> ASPP + space-to-depth decoder -> five heads (semantic, keypoint heatmaps,
    short-, middle- and long-range offsets), all predicted at stride 4 and upsampled to the
    (padded) input resolution.

    In training mode ``forward`` returns the loss dict. In eval mode it returns, per image,
    Detectron2's standard outputs at the image's original ``height`` x ``width``:
    ``sem_seg`` [C, H, W] logits, ``panoptic_seg`` (int32 id map, segments_info with
    ``id``, ``category_id`` (contiguous), ``isthing``, ``score``, ``area``) and ``instances``
    (``pred_masks``, ``pred_boxes``, ``pred_classes``, ``scores``) of the thing segments.
    The raw head outputs are available from :meth:`predict`.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        decoder: DeeperLabDecoder,
        heads: DeeperLabHeads,
        in_feature: str,
        low_level_feature: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        ignore_value: int = 255,
        sem_seg_loss_weight: float = 1.0,
        sem_seg_top_k_ratio: float = 0.15,
        heatmap_loss_weight: float = 1.0,
        short_offset_loss_weight: float = 1.0,
        mid_offset_loss_weight: float = 0.25,
        long_offset_loss_weight: float = 0.1,
        offset_normalizer: float = 25.0,
        thing_ids=None,
        post_process: Optional[PostProcessConfig] = None,
        panoptic_on: bool = True,
        instances_on: bool = True,
    ):
        """
        Args:
            backbone: a Detectron2 backbone giving ``in_feature`` and ``low_level_feature``.
            decoder, heads: see :mod:`deeperlab_d2.modeling.decoder`.
            pixel_mean, pixel_std: per-channel normalization of the input image.
            size_divisibility: inputs are padded to a multiple of it.
            offset_normalizer: the offset heads predict offsets divided by this value (better
                conditioned); outputs are multiplied back to pixels, and the L1 losses compare
                offsets divided by it.
            thing_ids: contiguous ids of the thing classes (needed for inference).
            post_process: thresholds of the panoptic post-processing.
            panoptic_on, instances_on: which inference outputs to return (``sem_seg`` always).
            others: loss weights, see ``add_deeperlab_config``.
        """
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.heads = heads
        self.in_feature = in_feature
        self.low_level_feature = low_level_feature
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.sem_seg_top_k_ratio = sem_seg_top_k_ratio
        self.heatmap_loss_weight = heatmap_loss_weight
        self.short_offset_loss_weight = short_offset_loss_weight
        self.mid_offset_loss_weight = mid_offset_loss_weight
        self.long_offset_loss_weight = long_offset_loss_weight
        self.offset_normalizer = offset_normalizer
        self.thing_ids = None if thing_ids is None else list(thing_ids)
        self.post_process = post_process or PostProcessConfig()
        self.panoptic_on = panoptic_on
        self.instances_on = instances_on

    @classmethod
    def from_config(cls, cfg):
        check_deeperlab_config(cfg)
        check_num_classes(cfg)
        c = cfg.MODEL.DEEPERLAB
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        for key, name in (("IN_FEATURE", c.IN_FEATURE), ("LOW_LEVEL_FEATURE", c.LOW_LEVEL_FEATURE)):
            if name not in shapes:
                raise ValueError(
                    f"MODEL.DEEPERLAB.{key} = {name!r} is not an output of backbone "
                    f"{cfg.MODEL.BACKBONE.NAME} (it gives {sorted(shapes)})"
                )
        high, low = shapes[c.IN_FEATURE], shapes[c.LOW_LEVEL_FEATURE]
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
        decoder = DeeperLabDecoder(
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
        )
        heads = DeeperLabHeads(
            in_channels=c.DECODER.OUT_CHANNELS,
            num_classes=c.NUM_CLASSES,
            num_keypoints=NUM_KEYPOINTS,
            num_edges=NUM_EDGES,
            sem_seg_channels=c.SEM_SEG_HEAD_CHANNELS,
            instance_channels=c.INSTANCE_HEAD_CHANNELS,
            kernel_size=c.HEAD_KERNEL_SIZE,
            norm=c.NORM,
        )
        size_div = c.SIZE_DIVISIBILITY
        if size_div <= 0:
            size_div = max(high.stride, 4 * (high.stride // low.stride))
        datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
        thing_ids = None
        if datasets:
            meta = MetadataCatalog.get(datasets[0])
            if hasattr(meta, "thing_dataset_id_to_contiguous_id"):
                thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
        p = c.POST_PROCESS
        return {
            "thing_ids": thing_ids,
            "post_process": post_process_config(cfg),
            "panoptic_on": p.PANOPTIC_ON,
            "instances_on": p.INSTANCES_ON,
            "backbone": backbone,
            "decoder": decoder,
            "heads": heads,
            "in_feature": c.IN_FEATURE,
            "low_level_feature": c.LOW_LEVEL_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": size_div,
            "ignore_value": c.IGNORE_VALUE,
            "sem_seg_loss_weight": c.LOSS.SEM_SEG_WEIGHT,
            "sem_seg_top_k_ratio": c.LOSS.SEM_SEG_TOP_K_RATIO,
            "heatmap_loss_weight": c.LOSS.HEATMAP_WEIGHT,
            "short_offset_loss_weight": c.LOSS.SHORT_OFFSET_WEIGHT,
            "mid_offset_loss_weight": c.LOSS.MID_OFFSET_WEIGHT,
            "long_offset_loss_weight": c.LOSS.LONG_OFFSET_WEIGHT,
            "offset_normalizer": c.LOSS.OFFSET_NORMALIZER,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def predict(
        self, images: torch.Tensor, image_sizes: Optional[Sequence[Tuple[int, int]]] = None
    ) -> Dict[str, torch.Tensor]:
        """Head outputs at the resolution of ``images`` (normalized, padded [N, 3, H, W]).

        Args:
            images: the batch, each image at the top-left of its padded slot.
            image_sizes: (h, w) per image, the part of ``images`` that is not batch padding
                (``ImageList.image_sizes``). The ASPP image pooling averages each image over
                the encoder cells that cover it (``ceil`` of the size at the encoder stride),
                not over the batch padding. (The convs still see the padding near the
                image's bottom/right border: see :meth:`forward`.) None: the whole tensor of
                every image is valid.

        Returns:
            raw head outputs (see :class:`DeeperLabHeads`), in the compute dtype (e.g.
            bfloat16 under autocast), offsets in input pixels.
        """
        features = self.backbone(images)
        high = features[self.in_feature]
        valid = None
        if image_sizes is not None:
            (H, W), (h_f, w_f) = images.shape[-2:], high.shape[-2:]
            # ceil(h * h_f / H): every encoder cell that covers at least one valid pixel
            valid = [(-(-int(h) * h_f // H), -(-int(w) * w_f // W)) for h, w in image_sizes]
        x = self.decoder(high, features[self.low_level_feature], valid)
        raw = self.heads(x)
        size = images.shape[-2:]
        out = {}
        for name, t in raw.items():
            if t.dim() == 5:  # offset fields [N, K, 2, h, w]
                n, k = t.shape[:2]
                up = F.interpolate(t.flatten(1, 2), size=size, mode="bilinear", align_corners=False)
                out[name] = up.view(n, k, 2, *size) * self.offset_normalizer
            else:
                out[name] = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: dataset dicts from the DeeperLab mapper: "image" [3, H, W] and, in
                training, the target tensors of :class:`DeeperLabTargetGenerator`.

        Returns:
            training: dict of scalar losses ``loss_*``; eval: see the class docstring.

        In eval mode an image's result does not depend on the other images of the batch:
        images are run in groups of equal padded size (``size_divisibility``), so each is
        padded exactly as it would be alone. Padding an image further (to batch it with a
        larger one) changes its features near its bottom/right border through every conv's
        receptive field (zero conv padding vs. features of the padded area), and through the
        dilated ASPP convs (dilation 18 cells = 288 px at output stride 16) far inside it.
        Training batches all images together; the ASPP image pooling then averages each image
        over its own valid region only.
        """
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        if self.training:
            images = ImageList.from_tensors(images, self.size_divisibility)
            outputs = self.predict(images.tensor, images.image_sizes)
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            return self.losses(outputs, targets)
        groups: Dict[Tuple[int, int], List[int]] = {}
        d = max(self.size_divisibility, 1)
        for i, image in enumerate(images):
            padded = tuple(-(-int(s) // d) * d for s in image.shape[-2:])
            groups.setdefault(padded, []).append(i)
        results: List[Optional[dict]] = [None] * len(images)
        for idx in groups.values():
            group = ImageList.from_tensors([images[i] for i in idx], self.size_divisibility)
            outputs = self.predict(group.tensor, group.image_sizes)
            inputs = [batched_inputs[i] for i in idx]
            for i, res in zip(idx, self.inference(outputs, inputs, group.image_sizes)):
                results[i] = res
        return results

    def inference(self, outputs: Dict[str, torch.Tensor], batched_inputs, image_sizes):
        """Post-process the head outputs of a batch into Detectron2's standard outputs.

        Whatever the head outputs' dtype (bfloat16/float16 under autocast, float64), the
        post-processing runs in float32 and ``sem_seg`` is float32. Non-finite ``sem_seg``
        logits (NaN, +-inf) are replaced by the lowest finite float32 (see
        :func:`mask_nonfinite_logits`): an argmax of ``sem_seg`` (SemSegEvaluator) picks the
        best finite logit, as the panoptic semantic map does; a pixel with no finite logit
        is void in ``panoptic_seg`` (and class 0 for an argmax of ``sem_seg``).
        """
        panoptic = [None] * len(image_sizes)
        if self.panoptic_on or self.instances_on:
            if self.thing_ids is None:
                raise ValueError(
                    "DeeperLab inference needs the thing classes: DATASETS.TEST (or TRAIN) must "
                    "name a registered dataset with thing_dataset_id_to_contiguous_id metadata"
                )
            panoptic = deeperlab_panoptic_inference(
                outputs["sem_seg"],
                outputs["heatmap"],
                outputs["short_offsets"],
                outputs["mid_offsets"],
                outputs["long_offsets"],
                self.thing_ids,
                self.post_process,
                image_sizes,
            )
        results = []
        for i, (image_size, inputs) in enumerate(zip(image_sizes, batched_inputs)):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            # sanitized before the resize (an interpolation weight of 0 times NaN/inf is NaN);
            # the clamp catches a weighted sum of lowest-finite values rounding to -inf
            logits = mask_nonfinite_logits(outputs["sem_seg"][i].float())
            sem_seg = sem_seg_postprocess(logits, image_size, height, width).float()
            res = {"sem_seg": sem_seg.clamp(min=torch.finfo(torch.float32).min)}
            if panoptic[i] is not None:
                pan = panoptic[i]["panoptic"]
                if tuple(pan.shape) != (height, width):
                    pan = F.interpolate(
                        pan[None, None].float(), size=(height, width), mode="nearest"
                    )
                    pan = pan[0, 0].to(torch.int32)
                segments = panoptic[i]["segments_info"]
                if self.panoptic_on:
                    res["panoptic_seg"] = (pan, segments)
                if self.instances_on:
                    res["instances"] = panoptic_to_instances(pan, segments)
            results.append(res)
        return results

    def prepare_targets(self, batched_inputs: List[dict], size) -> Dict[str, torch.Tensor]:
        """Pad every target tensor to the padded image size and stack them."""
        targets = {}
        for key, pad in TARGET_PAD_VALUES.items():
            if key not in batched_inputs[0]:
                raise KeyError(
                    f"training input has no {key!r}: DeeperLab must be trained with "
                    "DeeperLabDatasetMapper (see train_net.py)"
                )
            value = self.ignore_value if pad is None else pad
            tensors = [x[key].to(self.device) for x in batched_inputs]
            targets[key] = pad_and_stack(tensors, size, value)
        return targets

    def losses(self, outputs: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]):
        heat_mask = targets["heatmap"]  # the disks also mask short- and mid-range offsets
        edge_sources = [src for src, _ in KEYPOINT_EDGES]
        norm = self.offset_normalizer
        return {
            "loss_sem_seg": self.sem_seg_loss_weight
            * weighted_bootstrapped_cross_entropy(
                outputs["sem_seg"],
                targets["sem_seg"],
                targets["sem_seg_weights"],
                self.sem_seg_top_k_ratio,
                self.ignore_value,
            ),
            "loss_heatmap": self.heatmap_loss_weight
            * weighted_sigmoid_cross_entropy(
                outputs["heatmap"], targets["heatmap"], targets["heatmap_weights"]
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


def panoptic_to_instances(panoptic: torch.Tensor, segments_info: List[dict]) -> Instances:
    """Thing segments of a panoptic result as Detectron2 ``Instances`` (masks, boxes, classes,
    scores), at the panoptic map's resolution."""
    things = [s for s in segments_info if s["isthing"]]
    result = Instances(tuple(panoptic.shape))
    if things:
        ids = torch.tensor([s["id"] for s in things], device=panoptic.device)
        masks = panoptic[None] == ids[:, None, None]
    else:
        masks = torch.zeros((0, *panoptic.shape), dtype=torch.bool, device=panoptic.device)
    result.pred_masks = masks
    result.pred_boxes = BitMasks(masks).get_bounding_boxes()
    result.pred_classes = torch.tensor(
        [s["category_id"] for s in things], dtype=torch.int64, device=panoptic.device
    )
    result.scores = torch.tensor(
        [s["score"] for s in things], dtype=torch.float32, device=panoptic.device
    )
    return result
