"""Data: dataset registration (on import), target generation and the training mapper."""

from . import datasets  # noqa: F401  (registers the built-in datasets)
from .dataset_mapper import DatasetFileError, DeeperLabDatasetMapper, read_image_or_raise
from .target_generator import (
    CENTER,
    KEYPOINT_EDGES,
    KEYPOINT_NAMES,
    NUM_EDGES,
    NUM_KEYPOINTS,
    DeeperLabTargetGenerator,
    instance_keypoints,
)
