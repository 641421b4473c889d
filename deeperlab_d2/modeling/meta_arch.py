"""The DeeperLab meta-architecture (SPEC §1-5)."""

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ..config import check_deeperlab_config, check_num_classes
from ..layers.post_processing import mask_nonfinite_logits, panoptic_inference
from .decoder import DeeperLabDecoder, PredictionHead, build_deeperlab_decoder
from .instance_branches import InstanceBranch, build_instance_branch
from .losses import weighted_bootstrapped_cross_entropy

# Semantic target tensors the dataset mapper adds to each dataset dict, with their padding
# values (None = the ignore value); the instance branch adds its own (``target_pad_values``).
SEMANTIC_TARGET_PAD_VALUES = {"sem_seg": None, "sem_seg_weights": 0.0}


def pad_and_stack(tensors: Sequence[torch.Tensor], size, value: float) -> torch.Tensor:
    """Stack tensors [..., h_i, w_i] into [N, ..., H, W], padding bottom/right with ``value``."""
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], *size), value)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]].copy_(t)
    return out


@META_ARCH_REGISTRY.register()
class DeeperLab(nn.Module):
    """DeeperLab: single-shot panoptic image parser (Yang et al., 2019), with a pluggable
    instance representation.

    Backbone -> ASPP + space-to-depth decoder -> a semantic head and the heads of an instance
    branch (:mod:`deeperlab_d2.modeling.instance_branches`: DeeperLab's keypoints or
    Panoptic-DeepLab's centers, by ``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION``), predicted at
    stride 4 and upsampled to the (padded) input resolution.

    In training mode ``forward`` returns the loss dict (``loss_sem_seg`` and the branch's
    ``loss_*``). In eval mode it returns, per image, Detectron2's standard outputs at the
    image's original ``height`` x ``width``: ``sem_seg`` [C, H, W] float32 logits,
    ``panoptic_seg`` (int32 id map, segments_info with ``id``, ``category_id`` (contiguous),
    ``isthing``, ``score``, ``area``) and ``instances`` (``pred_masks``, ``pred_boxes``,
    ``pred_classes``, ``scores``) of the thing segments.

    The steps are public so that demos, pictures and diagnoses share one path:
    :meth:`preprocess` (normalize + pad), :meth:`predict` (head outputs), :meth:`run_heads`
    (both, grouped by padded size), :meth:`panoptic` (post-processing of head outputs) and
    :meth:`inference` (Detectron2's outputs).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        decoder: DeeperLabDecoder,
        sem_seg_head: nn.Module,
        instance_branch: InstanceBranch,
        in_feature: str,
        low_level_feature: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        ignore_value: int,
        sem_seg_loss_weight: float,
        sem_seg_top_k_ratio: float,
        thing_ids: Optional[Sequence[int]],
        panoptic_on: bool,
        instances_on: bool,
        channels_last: bool = False,
    ):
        """
        Args:
            backbone: a Detectron2 backbone giving ``in_feature`` and ``low_level_feature``.
            decoder: the shared ASPP + space-to-depth decoder.
            sem_seg_head: shared decoder output -> [N, C, H/4, W/4] semantic logits.
            instance_branch: heads, losses and inference of the instance representation.
            pixel_mean, pixel_std: per-channel normalization of the input image.
            size_divisibility: inputs are padded to a multiple of it.
            ignore_value: ignored semantic label.
            sem_seg_loss_weight, sem_seg_top_k_ratio: the bootstrapped CE.
            thing_ids: contiguous ids of the thing classes (needed for inference).
            panoptic_on, instances_on: which inference outputs to return (``sem_seg`` always).
            channels_last: keep the 4-D weights (so the feature maps) in the channels-last
                memory format: faster convolutions on the CPU (oneDNN). The same network.
        """
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.sem_seg_head = sem_seg_head
        self.instance_branch = instance_branch
        self.in_feature = in_feature
        self.low_level_feature = low_level_feature
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.sem_seg_top_k_ratio = sem_seg_top_k_ratio
        self.thing_ids = None if thing_ids is None else list(thing_ids)
        self.panoptic_on = panoptic_on
        self.instances_on = instances_on
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        check_deeperlab_config(cfg)
        check_num_classes(cfg)
        c = cfg.MODEL.DEEPERLAB
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        decoder = build_deeperlab_decoder(cfg, shapes)
        high, low = shapes[c.IN_FEATURE], shapes[c.LOW_LEVEL_FEATURE]
        size_div = c.SIZE_DIVISIBILITY
        if size_div <= 0:
            size_div = max(high.stride, 4 * (high.stride // low.stride))
        datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
        thing_ids = None
        if datasets:
            meta = MetadataCatalog.get(datasets[0])
            if hasattr(meta, "thing_dataset_id_to_contiguous_id"):
                thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
        sem_seg_head = PredictionHead(
            decoder.out_channels, c.SEM_SEG_HEAD_CHANNELS, c.NUM_CLASSES, c.HEAD_KERNEL_SIZE, c.NORM
        )
        return {
            "backbone": backbone,
            "decoder": decoder,
            "sem_seg_head": sem_seg_head,
            "instance_branch": build_instance_branch(cfg, decoder.out_channels, shapes),
            "in_feature": c.IN_FEATURE,
            "low_level_feature": c.LOW_LEVEL_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": size_div,
            "ignore_value": c.IGNORE_VALUE,
            "sem_seg_loss_weight": c.LOSS.SEM_SEG_WEIGHT,
            "sem_seg_top_k_ratio": c.LOSS.SEM_SEG_TOP_K_RATIO,
            "thing_ids": thing_ids,
            "panoptic_on": c.POST_PROCESS.PANOPTIC_ON,
            "instances_on": c.POST_PROCESS.INSTANCES_ON,
            "channels_last": c.CHANNELS_LAST,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ----------------------------------------------------------------------------------------
    # the network
    # ----------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[torch.Tensor]) -> ImageList:
        """uint8 (or float) [3, h_i, w_i] images -> normalized, padded to a multiple of
        ``size_divisibility``, on the model's device (the one preprocessing path)."""
        images = [(x.to(self.device) - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

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
            ``sem_seg`` [N, C, H, W] logits and the instance branch's outputs (see its
            class), in the compute dtype (e.g. bfloat16 under autocast).
        """
        features = self.backbone(images)
        high = features[self.in_feature]
        valid = None
        if image_sizes is not None:
            (H, W), (h_f, w_f) = images.shape[-2:], high.shape[-2:]
            # ceil(h * h_f / H): every encoder cell that covers at least one valid pixel
            valid = [(-(-int(h) * h_f // H), -(-int(w) * w_f // W)) for h, w in image_sizes]
        mid = features.get(self.decoder.mid_level_feature)
        x = self.decoder(high, features[self.low_level_feature], valid, mid)
        size = images.shape[-2:]
        out = {"sem_seg": F.interpolate(self.sem_seg_head(x), size=size, mode="bilinear")}
        out.update(self.instance_branch(x, features, size, valid))
        return out

    def run_heads(
        self, batched_inputs: List[dict]
    ) -> List[Tuple[List[int], Dict[str, torch.Tensor], List[Tuple[int, int]]]]:
        """Preprocess and predict a batch in groups of equal padded size.

        Returns:
            per group: (indices into ``batched_inputs``, head outputs of the padded group,
            each image's (h, w) at the network input).
        """
        groups: Dict[Tuple[int, int], List[int]] = {}
        d = max(self.size_divisibility, 1)
        for i, x in enumerate(batched_inputs):
            padded = tuple(-(-int(s) // d) * d for s in x["image"].shape[-2:])
            groups.setdefault(padded, []).append(i)
        out = []
        for idx in groups.values():
            images = self.preprocess([batched_inputs[i]["image"] for i in idx])
            out.append((idx, self.predict(images.tensor, images.image_sizes), images.image_sizes))
        return out

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: dataset dicts from the DeeperLab mapper: "image" [3, H, W] and, in
                training, the target tensors of the semantic and instance target generators.

        Returns:
            training: dict of scalar losses ``loss_*``; eval: see the class docstring.

        In eval mode an image's result does not depend on the other images of the batch:
        images are run in groups of equal padded size (``size_divisibility``, see
        :meth:`run_heads`), so each is padded exactly as it would be alone. Padding an image
        further (to batch it with a larger one) changes its features near its bottom/right
        border through every conv's receptive field (zero conv padding vs. features of the
        padded area), and through the dilated ASPP convs (dilation 18 cells = 288 px at output
        stride 16) far inside it. Training batches all images together; the ASPP image pooling
        then averages each image over its own valid region only.
        """
        if self.training:
            images = self.preprocess([x["image"] for x in batched_inputs])
            outputs = self.predict(images.tensor, images.image_sizes)
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            return self.losses(outputs, targets)
        results: List[Optional[dict]] = [None] * len(batched_inputs)
        for idx, outputs, sizes in self.run_heads(batched_inputs):
            inputs = [batched_inputs[i] for i in idx]
            for i, res in zip(idx, self.inference(outputs, inputs, sizes)):
                results[i] = res
        return results

    # ----------------------------------------------------------------------------------------
    # inference
    # ----------------------------------------------------------------------------------------
    def panoptic(
        self,
        outputs: Dict[str, torch.Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        return_maps: bool = False,
    ) -> List[Dict[str, object]]:
        """Post-process head outputs (at the network input resolution) into each image's
        panoptic result: the instance branch's instance inference, then the shared fusion
        (:func:`~deeperlab_d2.layers.post_processing.panoptic_inference`; float32, autocast
        off, NaN-safe semantic labels).

        Args:
            outputs: :meth:`predict`'s outputs.
            image_sizes: (h, w) of each image's valid part (None: the whole tensor).
            return_maps: also return the branch's intermediate maps (for pictures).

        Returns:
            per image a dict with ``panoptic`` [h, w] int32, ``segments_info``, ``semantic``,
            ``instance_map``, ``instance_scores`` and the branch's extras.
        """
        if self.thing_ids is None:
            raise ValueError(
                "DeeperLab inference needs the thing classes: DATASETS.TEST (or TRAIN) must "
                "name a registered dataset with thing_dataset_id_to_contiguous_id metadata"
            )
        branch = self.instance_branch
        return panoptic_inference(
            outputs["sem_seg"],
            {k: outputs[k] for k in branch.output_names},
            functools.partial(branch.instance_inference, return_maps=return_maps),
            self.thing_ids,
            branch.post_process,
            image_sizes,
        )

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
            panoptic = self.panoptic(outputs, image_sizes)
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

    # ----------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------
    def prepare_targets(self, batched_inputs: List[dict], size) -> Dict[str, torch.Tensor]:
        """Pad every target tensor to the padded image size and stack them."""
        pads = {**SEMANTIC_TARGET_PAD_VALUES, **self.instance_branch.target_pad_values}
        targets = {}
        for key, pad in pads.items():
            if key not in batched_inputs[0]:
                raise KeyError(
                    f"training input has no {key!r}: DeeperLab must be trained with "
                    "DeeperLabDatasetMapper (see train_net.py) built from the same config "
                    "(MODEL.DEEPERLAB.INSTANCE_REPRESENTATION)"
                )
            value = self.ignore_value if pad is None else pad
            tensors = [x[key].to(self.device) for x in batched_inputs]
            targets[key] = pad_and_stack(tensors, size, value)
        return targets

    def losses(self, outputs: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]):
        losses = {
            "loss_sem_seg": self.sem_seg_loss_weight
            * weighted_bootstrapped_cross_entropy(
                outputs["sem_seg"],
                targets["sem_seg"],
                targets["sem_seg_weights"],
                self.sem_seg_top_k_ratio,
                self.ignore_value,
            )
        }
        losses.update(self.instance_branch.losses(outputs, targets))
        return losses


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
