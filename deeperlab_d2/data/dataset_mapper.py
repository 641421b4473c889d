"""Training dataset mapper: read, check, augment, convert, then make the DeeperLab targets."""

import copy
import logging
from typing import Callable, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id

from .io import (
    AnnotationMismatchError,
    DatasetFileError,
    describe_ids,
    panoptic_id_mismatch,
    read_image_or_raise,
)

__all__ = [
    "AnnotationMismatchError",
    "DatasetFileError",
    "DeeperLabDatasetMapper",
    "check_panoptic_annotation",
    "read_image_or_raise",
]

logger = logging.getLogger(__name__)


def check_panoptic_annotation(panoptic: np.ndarray, segments_info: List[dict], pan_file: str):
    """Compare a decoded panoptic PNG with its ``segments_info``.

    Returns:
        a warning message (str) if some listed segments are absent from the PNG or the PNG has
        non-zero ids that are not listed, else None.

    Raises:
        AnnotationMismatchError: if segments are listed (or the PNG is not all void) but no
            listed segment is present in the PNG: every pixel would silently become void.
    """
    missing, unlisted, present = panoptic_id_mismatch(panoptic, segments_info)
    if not missing and not unlisted:
        return None
    found = len(segments_info) - len(missing)
    detail = (
        f"{len(missing)} of its {len(segments_info)} listed segments are absent from the PNG "
        f"(ids {describe_ids(missing)}) and {len(unlisted)} ids of the PNG are not listed "
        f"(ids {describe_ids(unlisted)})"
    )
    if found == 0:
        raise AnnotationMismatchError(
            f"panoptic annotation {pan_file!r} matches none of its segments_info: {detail}. The "
            "ids of a COCO-panoptic PNG are R + 256*G + 256^2*B of an RGB PNG (not a palette or "
            "a class map); check the PNG encoding and that the json names the right PNG"
        )
    return f"panoptic annotation {pan_file!r}: {detail}; those pixels are treated as void"


class DeeperLabDatasetMapper:
    """Maps a Detectron2 panoptic dataset dict to the inputs DeeperLab trains on.

    Input dict: ``file_name``, ``pan_seg_file_name``, ``segments_info`` (contiguous
    ``category_id``, ``iscrowd``), as produced by Detectron2's COCO / Cityscapes panoptic
    loaders. Output dict: ``image`` uint8 [3, H, W] plus every tensor of the target generator of
    the instance representation (``MODEL.DEEPERLAB.INSTANCE_REPRESENTATION``: the
    :class:`DeeperLabTargetGenerator` of keypoints, or the :class:`CenterTargetGenerator`),
    and the input's other keys.
    Never returns ``None``: an image without instances yields all-zero instance targets.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        target_generator: Callable,
        on_annotation_mismatch: str = "error",
    ):
        """
        Args:
            is_train: training mode (augmentations, targets).
            augmentations: Detectron2 augmentations applied to the image and the PNG.
            image_format: ``INPUT.FORMAT``.
            target_generator: callable(panoptic ids, segments_info) -> dict of target tensors.
            on_annotation_mismatch: what to do with an image whose PNG contains none of the
                segments it lists: ``"error"`` raises :class:`AnnotationMismatchError`;
                ``"skip"`` raises it too, and the train loader (see
                :func:`deeperlab_d2.data.build_train_loader`) replaces the image by another.
                Partial mismatches are a warning, once per file, in both modes.
        """
        if on_annotation_mismatch not in ("error", "skip"):
            raise ValueError(
                "on_annotation_mismatch (config key DATALOADER.ON_ANNOTATION_MISMATCH) must be "
                f"'error' or 'skip', got {on_annotation_mismatch!r}"
            )
        self.on_annotation_mismatch = on_annotation_mismatch
        self._checked_files = set()  # PNGs already compared with their segments_info
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.target_generator = target_generator
        logging.getLogger(__name__).info(f"DeeperLabDatasetMapper augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN,
                cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            )
        ]
        if cfg.INPUT.CROP.ENABLED:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(
                T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                    vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
                )
            )
        if not cfg.DATASETS.TRAIN:
            raise ValueError("config key DATASETS.TRAIN is empty: DeeperLab needs a dataset")
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            raise ValueError(
                f"dataset {cfg.DATASETS.TRAIN[0]!r} has no thing_dataset_id_to_contiguous_id "
                "metadata: DeeperLab trains on panoptic datasets"
            )
        # the instance branch's target generator (semantic targets included)
        from ..modeling.instance_branches import get_instance_branch_class

        target_generator = get_instance_branch_class(cfg).target_generator_from_config(
            cfg, list(meta.thing_dataset_id_to_contiguous_id.values())
        )
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "target_generator": target_generator,
            "on_annotation_mismatch": cfg.DATALOADER.ON_ANNOTATION_MISMATCH,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image_file = dataset_dict["file_name"]
        image = read_image_or_raise(image_file, self.image_format)
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise DatasetFileError(f"image {image_file!r}: {e}") from e
        if "pan_seg_file_name" not in dataset_dict:
            raise DatasetFileError(
                f"dataset dict of {image_file!r} has no 'pan_seg_file_name': DeeperLab needs "
                "panoptic annotations"
            )
        pan_file = dataset_dict.pop("pan_seg_file_name")
        pan_rgb = read_image_or_raise(pan_file, "RGB", what="panoptic annotation")
        if pan_rgb.shape[:2] != image.shape[:2]:
            raise DatasetFileError(
                f"panoptic annotation {pan_file!r} is {pan_rgb.shape[1]}x{pan_rgb.shape[0]} "
                f"but image {image_file!r} is {image.shape[1]}x{image.shape[0]}"
            )
        segments_info = dataset_dict.pop("segments_info")
        if pan_file not in self._checked_files:
            # before augmentation: a crop may legitimately remove segments
            warning = check_panoptic_annotation(rgb2id(pan_rgb), segments_info, pan_file)
            self._checked_files.add(pan_file)
            if warning:
                logger.warning(warning)

        # The RGB-encoded ids are transformed as a segmentation (nearest), then decoded.
        aug_input = T.AugInput(image, sem_seg=pan_rgb)
        self.augmentations(aug_input)
        image, pan_rgb = aug_input.image, aug_input.sem_seg
        panoptic = rgb2id(pan_rgb)

        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict.update(self.target_generator(panoptic, segments_info))
        return dataset_dict
