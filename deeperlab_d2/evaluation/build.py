"""Evaluators for a dataset, chosen from its metadata's ``evaluator_type``."""

import os
from typing import Callable, Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from .parsing_covering import ParsingCoveringEvaluator


def _has_sem_seg_files(dataset_name: str) -> bool:
    records = DatasetCatalog.get(dataset_name)
    return bool(records) and "sem_seg_file_name" in records[0]


def _panoptic_evaluators(dataset_name: str, output_dir: str) -> List[DatasetEvaluator]:
    """PQ (panopticapi), Parsing Covering, mIoU (if semantic PNGs exist) and instance AP (if an
    instances json exists) for a panoptic dataset."""
    meta = MetadataCatalog.get(dataset_name)
    evaluators: List[DatasetEvaluator] = [
        COCOPanopticEvaluator(dataset_name, output_dir),
        ParsingCoveringEvaluator(dataset_name, output_dir),
    ]
    if _has_sem_seg_files(dataset_name):
        sem_seg = SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir)
        # detectron2 0.6's builtin COCO / Cityscapes panoptic metadata map only the stuff
        # classes in stuff_dataset_id_to_contiguous_id; its SemSegEvaluator then fails on a
        # predicted thing class ("Label 0 is not in the metadata info"): map the things too
        if getattr(sem_seg, "_contiguous_id_to_dataset_id", None) is not None:
            things = getattr(meta, "thing_dataset_id_to_contiguous_id", None) or {}
            for dataset_id, contiguous_id in things.items():
                sem_seg._contiguous_id_to_dataset_id.setdefault(contiguous_id, dataset_id)
        evaluators.append(sem_seg)
    if getattr(meta, "json_file", None) and os.path.isfile(meta.json_file):
        # the C++ COCOeval of detectron2 is not built by scripts/install.sh
        evaluators.append(
            COCOEvaluator(
                dataset_name,
                tasks=("bbox", "segm"),
                distributed=True,
                output_dir=output_dir,
                use_fast_impl=False,
            )
        )
    return evaluators


def _coco_instance_evaluators(dataset_name: str, output_dir: str) -> List[DatasetEvaluator]:
    """Box (and mask, if predicted) AP of a COCO-format instance dataset (Detectron2's stock
    detectors of configs/detectron2)."""
    return [
        COCOEvaluator(dataset_name, distributed=True, output_dir=output_dir, use_fast_impl=False)
    ]


def _sem_seg_evaluators(dataset_name: str, output_dir: str) -> List[DatasetEvaluator]:
    """mIoU of a semantic segmentation dataset (Detectron2's SemanticSegmentor)."""
    return [SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir)]


#: evaluator_type -> factory(dataset_name, output_dir) -> list of evaluators
EVALUATOR_FACTORIES: Dict[str, Callable[[str, str], List[DatasetEvaluator]]] = {
    "coco_panoptic_seg": _panoptic_evaluators,
    "cityscapes_panoptic_seg": _panoptic_evaluators,
    # Detectron2's stock meta-architectures on the plugin's backbones (configs/detectron2)
    "coco": _coco_instance_evaluators,
    "sem_seg": _sem_seg_evaluators,
}


def build_evaluator(cfg, dataset_name: str, output_dir: str = None) -> DatasetEvaluator:
    """The evaluators of ``dataset_name`` from its ``evaluator_type`` (see
    :data:`EVALUATOR_FACTORIES`); raises ``NotImplementedError`` for other types, as Detectron2's
    DefaultTrainer expects."""
    output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
    if evaluator_type not in EVALUATOR_FACTORIES:
        raise NotImplementedError(
            f"no DeeperLab evaluator for dataset {dataset_name!r} of evaluator_type "
            f"{evaluator_type!r} (supported: {sorted(EVALUATOR_FACTORIES)})"
        )
    return DatasetEvaluators(EVALUATOR_FACTORIES[evaluator_type](dataset_name, output_dir))


#: (column, task, key) of the one-line summary of a DeeperLab evaluation
SUMMARY_COLUMNS = (
    ("PQ", "panoptic_seg", "PQ"),
    ("SQ", "panoptic_seg", "SQ"),
    ("RQ", "panoptic_seg", "RQ"),
    ("PQ_th", "panoptic_seg", "PQ_th"),
    ("PQ_st", "panoptic_seg", "PQ_st"),
    ("PC", "parsing_covering", "PC"),
    ("PC_th", "parsing_covering", "PC_th"),
    ("PC_st", "parsing_covering", "PC_st"),
    ("mIoU", "sem_seg", "mIoU"),
    ("AP_mask", "segm", "AP"),
    ("AP_box", "bbox", "AP"),
)


def summary_table(results: Dict[str, Dict[str, Dict[str, float]]], dataset_name: str = "") -> str:
    """One markdown table (a row per dataset) of the main metrics of ``DefaultTrainer.test``
    results (``{dataset: {task: {metric: value}}}``, or the single-dataset ``{task: ...}``,
    whose row is named ``dataset_name``)."""
    tasks_known = {task for _, task, _ in SUMMARY_COLUMNS}
    if results and all(task in tasks_known for task in results):
        results = {dataset_name: results}
    header = "| dataset | " + " | ".join(c for c, _, _ in SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for name, tasks in results.items():
        cells = []
        for _, task, key in SUMMARY_COLUMNS:
            value = tasks.get(task, {}).get(key)
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
