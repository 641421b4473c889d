"""Built-in datasets of deeperlab_d2, registered in Detectron2's catalogs on import.

``deeperlab_synthetic_train`` / ``deeperlab_synthetic_val`` live under
``$DETECTRON2_DATASETS/deeperlab_synthetic`` (default ``./datasets``); generate them with
``python datasets/prepare_synthetic.py``. ``mapillary_vistas_panoptic_train`` /
``mapillary_vistas_panoptic_val`` (Mapillary Vistas v1.2) live under
``$DETECTRON2_DATASETS/mapillary_vistas``; prepare them with
``python datasets/prepare_mapillary_vistas.py``. COCO panoptic and Cityscapes panoptic are
registered by detectron2 itself (``coco_2017_*_panoptic``, ``cityscapes_fine_panoptic_*``).
"""

import os

from .mapillary_vistas import (
    get_mapillary_vistas_metadata,
    load_mapillary_vistas_panoptic,
    mapillary_vistas_split_paths,
    read_mapillary_vistas_categories,
    register_mapillary_vistas_panoptic,
)
from .synthetic import (
    SYNTHETIC_CATEGORIES,
    get_synthetic_metadata,
    load_deeperlab_synthetic,
    register_deeperlab_synthetic,
    synthetic_split_paths,
)

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "get_mapillary_vistas_metadata",
    "get_synthetic_metadata",
    "load_deeperlab_synthetic",
    "load_mapillary_vistas_panoptic",
    "mapillary_vistas_split_paths",
    "read_mapillary_vistas_categories",
    "register_all",
    "register_deeperlab_synthetic",
    "register_mapillary_vistas_panoptic",
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
    if "mapillary_vistas_panoptic_train" not in DatasetCatalog.list():
        register_mapillary_vistas_panoptic(root)


register_all(os.getenv("DETECTRON2_DATASETS", "datasets"))
