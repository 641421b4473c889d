"""Training dataset mapper: read, augment, convert, then make the DeeperLab targets."""

import copy
import logging
from typing import Callable, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id

from .target_generator import DeeperLabTargetGenerator

__all__ = ["DeeperLabDatasetMapper", "read_image_or_raise"]


class DatasetFileError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def read_image_or_raise(file_name: str, fmt: Optional[str], what: str = "image") -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` with an error that names the file.

    Raises:
        DatasetFileError: if the file is missing or cannot be decoded.
    """
    try:
        return utils.read_image(file_name, format=fmt)
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these on bad files
        raise DatasetFileError(f"cannot read {what} {file_name!r}: {e}") from e


class DeeperLabDatasetMapper:
    """Maps a Detectron2 panoptic dataset dict to the inputs DeeperLab trains on.

    Input dict: ``file_name``, ``pan_seg_file_name``, ``segments_info`` (contiguous
    ``category_id``, ``iscrowd``), as produced by Detectron2's COCO / Cityscapes panoptic
    loaders. Output dict: ``image`` uint8 [3, H, W] plus every tensor documented in
    :class:`DeeperLabTargetGenerator` (``keypoints`` included), and the input's other keys.
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
    ):
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
        t = cfg.MODEL.DEEPERLAB.TARGETS
        target_generator = DeeperLabTargetGenerator(
            ignore_label=cfg.MODEL.DEEPERLAB.IGNORE_VALUE,
            thing_ids=list(meta.thing_dataset_id_to_contiguous_id.values()),
            keypoint_radius=t.KEYPOINT_RADIUS,
            small_instance_area=t.SMALL_INSTANCE_AREA,
            small_instance_weight=t.SMALL_INSTANCE_WEIGHT,
            ignore_void_in_heatmap=t.IGNORE_VOID_IN_HEATMAP,
        )
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "target_generator": target_generator,
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

        # The RGB-encoded ids are transformed as a segmentation (nearest), then decoded.
        aug_input = T.AugInput(image, sem_seg=pan_rgb)
        self.augmentations(aug_input)
        image, pan_rgb = aug_input.image, aug_input.sem_seg
        panoptic = rgb2id(pan_rgb)

        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict.update(self.target_generator(panoptic, segments_info))
        return dataset_dict
