"""Registration of a panoptic dataset split in Detectron2's catalogs (shared by the datasets)."""

from typing import Callable, List


def register_panoptic_split(name: str, loader: Callable[[], List[dict]], metadata: dict) -> None:
    """(Re-)register ``name`` lazily: ``loader`` runs on ``DatasetCatalog.get(name)``.

    A name that is already registered is replaced. The metadata follows the COCO-panoptic
    convention of Detectron2 (``evaluator_type="coco_panoptic_seg"``, ``ignore_label=255``,
    ``label_divisor=1000``) plus ``metadata`` (paths, classes, id maps).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000, **metadata
    )
