"""Built-in datasets of deeperlab_d2, registered in Detectron2's catalogs on import.

``deeperlab_synthetic_train`` / ``deeperlab_synthetic_val`` live under
``$DETECTRON2_DATASETS/deeperlab_synthetic`` (default ``./datasets``); generate them with
``python datasets/prepare_synthetic.py``. COCO panoptic and Cityscapes panoptic are registered
by detectron2 itself (``coco_2017_*_panoptic``, ``cityscapes_fine_panoptic_*``).
"""

import os

from .synthetic import (
    SYNTHETIC_CATEGORIES,
    get_synthetic_metadata,
    load_deeperlab_synthetic,
    register_deeperlab_synthetic,
    synthetic_split_paths,
)

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "get_synthetic_metadata",
    "load_deeperlab_synthetic",
    "register_all",
    "register_deeperlab_synthetic",
    "synthetic_split_paths",
]


def register_all(root: str) -> None:
    """Register every built-in dataset of the plugin, unless already registered.

    Args:
        root: datasets root, usually ``$DETECTRON2_DATASETS``.
    """
    from detectron2.data import DatasetCatalog

    if "deeperlab_synthetic_train" not in DatasetCatalog.list():
        register_deeperlab_synthetic(root)


register_all(os.getenv("DETECTRON2_DATASETS", "datasets"))
