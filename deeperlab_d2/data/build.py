"""Train/test loaders: Detectron2's, with dataset-loading errors that name the dataset and file,
and mismatched annotations skipped when ``DATALOADER.ON_ANNOTATION_MISMATCH`` is ``"skip"``."""

import json
import logging
from typing import Callable, List, Sequence

import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)

from .io import AnnotationMismatchError, DatasetFileError

__all__ = ["MapSkippingMismatches", "build_test_loader", "build_train_loader", "load_dataset"]

logger = logging.getLogger(__name__)


def load_dataset(name: str) -> List[dict]:
    """``DatasetCatalog.get(name)`` whose errors name the dataset and its annotation file.

    Detectron2's own loaders (COCO / Cityscapes panoptic) fail with a bare ``KeyError: 99`` on
    an unknown category or a ``JSONDecodeError`` on a broken json; for COCO-panoptic datasets
    the json is then re-read by :func:`deeperlab_d2.data.datasets.load_panoptic_json`, whose
    error names the file, the image and the segment.

    Raises:
        DatasetFileError: on a broken json, an unknown category or an empty dataset.
    """
    try:
        records = DatasetCatalog.get(name)
    except DatasetFileError:
        raise
    except (KeyError, json.JSONDecodeError, AssertionError) as e:
        meta = MetadataCatalog.get(name)
        json_file = getattr(meta, "panoptic_json", None) or getattr(meta, "json_file", None)
        if getattr(meta, "panoptic_json", None) and getattr(meta, "panoptic_root", None):
            from .datasets.coco_panoptic import load_panoptic_json

            # the same files through the checked loader: raises an error naming the culprit
            load_panoptic_json(
                meta.panoptic_json, meta.image_root, meta.panoptic_root, meta.as_dict()
            )
        raise DatasetFileError(
            f"cannot load dataset {name!r} (annotations: {json_file!r}): {type(e).__name__}: {e}"
        ) from e
    if not records:
        raise DatasetFileError(f"dataset {name!r} has no records")
    return records


class MapSkippingMismatches(torch.utils.data.Dataset):
    """Records mapped by a mapper; an image whose annotation matches none of its segments
    (:class:`AnnotationMismatchError`) is replaced by the next good one, with a warning naming
    it (once per file). Detectron2's own ``MapDataset`` retries only on ``None``, which our
    mappers never return (its retry crashes on Python 3.11)."""

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], dict]):
        self.records, self.mapper = records, mapper
        self._skipped = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict:
        n = len(self.records)
        for step in range(n):
            record = self.records[(int(idx) + step) % n]
            try:
                return self.mapper(record)
            except AnnotationMismatchError as e:
                key = record.get("pan_seg_file_name", record.get("file_name"))
                if key not in self._skipped:
                    self._skipped.add(key)
                    logger.warning(
                        f"skipping an image (DATALOADER.ON_ANNOTATION_MISMATCH skip): {e}"
                    )
        raise DatasetFileError(
            f"every one of the {n} training images has a panoptic annotation that matches none "
            "of its segments (see the warnings above): nothing to train on"
        )


def build_train_loader(cfg, mapper):
    """Detectron2's train loader over ``cfg.DATASETS.TRAIN`` with ``mapper``; the datasets are
    loaded by :func:`load_dataset`, and mismatched annotations are skipped if the mapper was
    built with ``on_annotation_mismatch="skip"``."""
    records = [r for name in cfg.DATASETS.TRAIN for r in load_dataset(name)]
    if getattr(mapper, "on_annotation_mismatch", "error") == "skip":
        # the mapping happens inside the dataset; Detectron2 would replace mapper=None by its
        # own DatasetMapper, so give it the identity
        return build_detection_train_loader(
            cfg, dataset=MapSkippingMismatches(records, mapper), mapper=_identity
        )
    return build_detection_train_loader(cfg, dataset=records, mapper=mapper)


def _identity(x):
    return x


def build_test_loader(cfg, dataset_name: str, mapper=None):
    """Detectron2's test loader of one dataset (``DatasetMapper(cfg, False)`` unless ``mapper``
    is given), the dataset loaded by :func:`load_dataset`."""
    records = load_dataset(dataset_name)
    return build_detection_test_loader(
        records,
        mapper=mapper if mapper is not None else DatasetMapper(cfg, False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
