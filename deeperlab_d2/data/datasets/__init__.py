"""Built-in datasets of deeperlab_d2, registered in Detectron2's catalogs on import.

``deeperlab_synthetic_train`` / ``deeperlab_synthetic_val`` live under
``$DETECTRON2_DATASETS/deeperlab_synthetic`` (default ``./datasets``); generate them with
``python datasets/prepare_synthetic.py`` (the default "appearance" variant: thing classes differ
in shape and in colour / texture family). ``deeperlab_synthetic_shape_train`` /
``deeperlab_synthetic_shape_val`` are the "shape" variant (random colours, thing classes differ
by shape only; the same annotations), under ``$DETECTRON2_DATASETS/deeperlab_synthetic_shape``;
generate them with ``python datasets/prepare_synthetic.py --variant shape``.
``mapillary_vistas_panoptic_train`` / ``mapillary_vistas_panoptic_val`` (Mapillary Vistas v1.2)
live under ``$DETECTRON2_DATASETS/mapillary_vistas``; prepare them with
``python datasets/prepare_mapillary_vistas.py``. COCO panoptic and Cityscapes panoptic are
registered by detectron2 itself (``coco_2017_*_panoptic``, ``cityscapes_fine_panoptic_*``);
deeperlab_d2 adds ``coco_2017_{train,val}_panoptic_with_sem_seg`` (the same plus the semantic PNGs
of ``python datasets/prepare_coco_semantic_from_panoptic.py``). Register your own
COCO-panoptic-format data with :func:`register_coco_panoptic_dataset`.
"""

import os
from typing import Dict, List

from .custom import (
    contiguous_id_map,
    get_panoptic_metadata,
    register_coco_panoptic_dataset,
    register_coco_panoptic_with_sem_seg,
)
from .mapillary_vistas import (
    get_mapillary_vistas_metadata,
    load_mapillary_vistas_panoptic,
    mapillary_vistas_split_paths,
    read_mapillary_vistas_categories,
    register_mapillary_vistas_panoptic,
)
from .registration import register_panoptic_split
from .synthetic import (
    SYNTHETIC_CATEGORIES,
    get_synthetic_metadata,
    load_deeperlab_synthetic,
    register_deeperlab_synthetic,
    synthetic_split_paths,
)
from .synthetic_categories import (
    SYNTHETIC_DATASET_NAME,
    SYNTHETIC_SHAPE_DATASET_NAME,
    SYNTHETIC_SPLITS,
)

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "contiguous_id_map",
    "get_panoptic_metadata",
    "get_mapillary_vistas_metadata",
    "get_synthetic_metadata",
    "load_deeperlab_synthetic",
    "load_mapillary_vistas_panoptic",
    "mapillary_vistas_split_paths",
    "read_mapillary_vistas_categories",
    "register_all",
    "register_coco_panoptic_dataset",
    "register_coco_panoptic_with_sem_seg",
    "register_deeperlab_synthetic",
    "register_deeperlab_synthetic_shape",
    "register_mapillary_vistas_panoptic",
    "synthetic_shape_split_paths",
    "synthetic_split_paths",
]


def synthetic_shape_split_paths(root: str, split: str) -> Dict[str, str]:
    """:func:`synthetic_split_paths` of the "shape" variant (under
    ``<root>/deeperlab_synthetic_shape``)."""
    return synthetic_split_paths(root, split, variant="shape")


def register_deeperlab_synthetic_shape(
    root: str, prefix: str = SYNTHETIC_SHAPE_DATASET_NAME
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val``: the "shape" variant of the synthetic
    dataset (``python datasets/prepare_synthetic.py --variant shape``), thing classes that
    differ by shape only, under random colours: a harder benchmark than the default variant.
    :func:`register_deeperlab_synthetic` with ``variant="shape"`` (lazy, same metadata; loading
    before generating raises a :class:`FileNotFoundError` naming the command)."""
    return register_deeperlab_synthetic(root, prefix, variant="shape")


def register_all(root: str) -> None:
    """Register every built-in dataset of the plugin, unless already registered.

    Args:
        root: datasets root, usually ``$DETECTRON2_DATASETS``.
    """
    from detectron2.data import DatasetCatalog

    if "deeperlab_synthetic_train" not in DatasetCatalog.list():
        register_deeperlab_synthetic(root)
    if "deeperlab_synthetic_shape_train" not in DatasetCatalog.list():
        register_deeperlab_synthetic_shape(root)
    if "mapillary_vistas_panoptic_train" not in DatasetCatalog.list():
        register_mapillary_vistas_panoptic(root)
    if "coco_2017_train_panoptic_with_sem_seg" not in DatasetCatalog.list():
        register_coco_panoptic_with_sem_seg(root)


register_all(os.getenv("DETECTRON2_DATASETS", "datasets"))
