"""Pre-flight check of datasets: read every record once and report every problem found.

``python train_net.py --config-file <cfg> --check-data`` runs :func:`check_datasets` on
``DATASETS.TRAIN`` and ``DATASETS.TEST`` and prints one report, so that a user learns of all bad
files before a long run rather than one at a random iteration.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from panopticapi.utils import rgb2id

from .dataset_mapper import check_panoptic_annotation
from .io import DatasetFileError, describe_ids, read_image_or_raise

__all__ = ["DataProblem", "DatasetReport", "check_dataset", "check_datasets", "check_record"]

logger = logging.getLogger(__name__)


@dataclass
class DataProblem:
    """One problem: ``severity`` is ``"error"`` (training or evaluation would fail or learn from
    wrong targets) or ``"warning"`` (some pixels become void)."""

    severity: str
    where: str  # the file (or dataset) concerned
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.where}: {self.message}"


@dataclass
class DatasetReport:
    dataset: str
    num_records: int = 0
    problems: List[DataProblem] = field(default_factory=list)

    @property
    def num_errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def num_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def format(self, max_lines: int = 200) -> str:
        head = (
            f"dataset {self.dataset!r}: {self.num_records} records checked, "
            f"{self.num_errors} errors, {self.num_warnings} warnings"
        )
        lines = [head] + [f"  {p}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"  ... and {len(self.problems) - max_lines} more")
        return "\n".join(lines)


def check_record(
    record: dict, num_classes: Optional[int], thing_ids: Optional[Sequence[int]], image_format: str
) -> List[DataProblem]:
    """Every problem of one panoptic record: files exist and decode, sizes agree (image, record
    ``height``/``width``, panoptic PNG, semantic PNG), the PNG's ids match ``segments_info``,
    segment ids are unique and categories are known (contiguous id < ``num_classes``, ``isthing``
    consistent with ``thing_ids``)."""
    problems = []
    image_file = record.get("file_name", "<no file_name>")

    def err(where, msg, severity="error"):
        problems.append(DataProblem(severity, where, msg))

    def wh(shape):
        return f"{shape[1]}x{shape[0]}"

    size = None
    try:
        image = read_image_or_raise(image_file, image_format)
        size = image.shape[:2]
        expected = (record.get("height"), record.get("width"))
        if None not in expected and tuple(expected) != tuple(size):
            err(
                image_file,
                f"image is {size[1]}x{size[0]} but its record says {expected[1]}x{expected[0]}",
            )
    except DatasetFileError as e:
        err(image_file, str(e))

    segments = record.get("segments_info")
    if segments is None:
        err(image_file, "record has no 'segments_info'")
        segments = []
    seg_ids = [s.get("id") for s in segments]
    duplicates = sorted({i for i in seg_ids if seg_ids.count(i) > 1})
    if duplicates:
        err(image_file, f"segments_info lists ids more than once: {describe_ids(duplicates)}")
    things = None if thing_ids is None else set(thing_ids)
    for s in segments:
        cat = s.get("category_id")
        if not isinstance(cat, int) or cat < 0 or (num_classes is not None and cat >= num_classes):
            err(
                image_file,
                f"segment {s.get('id')} has category_id {cat!r}, not a contiguous class id "
                f"in [0, {num_classes if num_classes else '?'})",
            )
        elif things is not None and bool(s.get("isthing")) != (cat in things):
            err(
                image_file,
                f"segment {s.get('id')} (category {cat}) has isthing={s.get('isthing')} but "
                f"the metadata says {'thing' if cat in things else 'stuff'}",
            )

    pan_file = record.get("pan_seg_file_name")
    if pan_file is None:
        err(image_file, "record has no 'pan_seg_file_name'")
    else:
        try:
            pan = read_image_or_raise(pan_file, "RGB", what="panoptic annotation")
            if size is not None and pan.shape[:2] != size:
                err(
                    pan_file,
                    f"panoptic PNG is {wh(pan.shape)} but its image is {wh(size)}",
                )
            warning = check_panoptic_annotation(rgb2id(pan), segments, pan_file)
            if warning:
                err(pan_file, warning.split(": ", 1)[1], "warning")
        except DatasetFileError as e:  # AnnotationMismatchError included
            err(pan_file, str(e))

    sem_file = record.get("sem_seg_file_name")
    if sem_file is not None:
        try:
            sem = read_image_or_raise(sem_file, "L", what="semantic annotation")
            if size is not None and sem.shape[:2] != size:
                err(
                    sem_file,
                    f"semantic PNG is {wh(sem.shape)} but its image is {wh(size)}",
                )
        except DatasetFileError as e:
            err(sem_file, str(e))
    return problems


def check_dataset(
    name: str, num_classes: Optional[int] = None, image_format: str = "RGB", workers: int = 2
) -> DatasetReport:
    """Load a registered dataset and check every record (see :func:`check_record`); loading
    errors (broken json, unknown category, missing files) are reported, not raised."""
    from detectron2.data import MetadataCatalog

    from .build import load_dataset

    report = DatasetReport(name)
    try:
        records = load_dataset(name)
    except (DatasetFileError, FileNotFoundError, ValueError, KeyError, OSError) as e:
        report.problems.append(DataProblem("error", name, f"cannot load the dataset: {e}"))
        return report
    meta = MetadataCatalog.get(name)
    thing_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    thing_ids = None if thing_map is None else list(thing_map.values())
    report.num_records = len(records)
    start, step = time.perf_counter(), max(1, len(records) // 10)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda r: check_record(r, num_classes, thing_ids, image_format), records)
        for i, problems in enumerate(results):
            report.problems += problems
            if (i + 1) % step == 0 or i + 1 == len(records):
                logger.info(
                    f"check {name}: {i + 1}/{len(records)} records, {len(report.problems)} "
                    f"problems, {time.perf_counter() - start:.0f} s"
                )
    return report


def check_datasets(cfg, workers: Optional[int] = None) -> List[DatasetReport]:
    """Check every dataset of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` of a DeeperLab config."""
    workers = workers or max(1, cfg.DATALOADER.NUM_WORKERS)
    names = list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    return [
        check_dataset(n, cfg.MODEL.DEEPERLAB.NUM_CLASSES, cfg.INPUT.FORMAT, workers) for n in names
    ]
