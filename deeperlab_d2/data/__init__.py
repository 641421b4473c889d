"""Data: dataset registration (on import), target generation and the training mapper."""

from . import datasets  # noqa: F401  (registers the built-in datasets)
from .build import build_test_loader, build_train_loader, load_dataset
from .dataset_mapper import DeeperLabDatasetMapper, check_panoptic_annotation
from .io import AnnotationMismatchError, DatasetFileError, read_image_or_raise, read_json_or_raise
from .target_generator import (
    CENTER,
    KEYPOINT_EDGES,
    KEYPOINT_NAMES,
    NUM_EDGES,
    NUM_KEYPOINTS,
    DeeperLabTargetGenerator,
    instance_keypoints,
)
