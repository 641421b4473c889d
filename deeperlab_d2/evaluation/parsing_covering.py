"""Parsing Covering (PC), the region-based panoptic metric of DeeperLab.

For every class ``i`` with ground-truth regions ``S_i`` and predicted regions ``S'_i``::

    Cov_i = (1 / N_i) * sum_{R in S_i} |R| * max_{R' in S'_i} IoU(R, R'),   N_i = sum_{R in S_i} |R|

and ``PC`` is the mean of ``Cov_i`` over the classes with ``N_i > 0`` (``PC_th`` / ``PC_st``: the
same mean over the thing / stuff classes only). Regions only match regions of the same class.

Conventions (as in DeepLab's reference evaluation code, plus COCO-panoptic crowd regions):

* Pixels whose ground truth is void (segment id 0, or an id missing from the ground-truth
  segment list) and pixels of ground-truth crowd regions (``iscrowd=1``) are removed from every
  region before areas, intersections and unions are measured: a predicted region is never
  penalized for covering them, and crowd regions are not ground-truth regions.
* Predicted pixels with id 0, or an id missing from the predicted segment list, belong to no
  predicted region.
* ``normalize_by_image_size=True`` (default): each image's per-class sums ``sum |R|`` and
  ``sum |R| * max IoU`` are divided by that image's total pixel count ``H * W`` (void and crowd
  pixels included, as DeepLab divides by the size of the ground-truth label array) before they
  are accumulated over the dataset, so every image weighs the same whatever its resolution.
  ``False``: plain pixel sums.
"""

import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["ParsingCoveringEvaluator", "parsing_covering_from_stats", "parsing_covering_stats"]

logger = logging.getLogger(__name__)


def _segment_table(
    segments: Iterable[dict], num_classes: int, what: str, skip_crowd: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """Ids and categories of the regions of a segment list.

    Args:
        segments: dicts with ``id`` and contiguous ``category_id`` (and optional ``iscrowd``).
        num_classes: number of contiguous classes.
        what: ``"ground-truth"`` or ``"predicted"`` (for error messages).
        skip_crowd: drop segments with a true ``iscrowd`` (they become void).

    Returns:
        (ids, categories): int64 arrays, one entry per kept segment (segments with id 0 are
        dropped: id 0 is void).
    """
    ids, cats = [], []
    for seg in segments:
        if skip_crowd and seg.get("iscrowd", 0):
            continue
        seg_id = int(seg["id"])
        if seg_id == 0:
            continue
        cat = int(seg["category_id"])
        if not 0 <= cat < num_classes:
            raise ValueError(
                f"{what} segment {seg_id} has category_id {cat}, outside [0, {num_classes})."
            )
        ids.append(seg_id)
        cats.append(cat)
    return np.asarray(ids, dtype=np.int64), np.asarray(cats, dtype=np.int64)


def _index_map(id_map: np.ndarray, seg_ids: np.ndarray) -> np.ndarray:
    """Replace every pixel's segment id by ``1 + `` its position in ``seg_ids`` (0 if absent).

    Args:
        id_map: [H, W] integer segment-id map.
        seg_ids: [S] segment ids (if an id is repeated, its first occurrence wins).

    Returns:
        [H * W] int64 array with values in ``[0, S]``.
    """
    flat = id_map.reshape(-1).astype(np.int64, copy=False)
    if seg_ids.size == 0:
        return np.zeros(flat.shape, dtype=np.int64)
    order = np.argsort(seg_ids, kind="stable")
    sorted_ids = seg_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, flat), sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == flat, order[pos] + 1, 0)


def parsing_covering_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    num_classes: int,
    normalize_by_image_size: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class Parsing Covering sums of one image.

    All intersections come from a single ``np.bincount`` over paired (ground truth, prediction)
    region indices.

    Args:
        gt_ids: [H, W] integer ground-truth segment-id map (0 = void).
        gt_segments: ground-truth segments: dicts with ``id``, contiguous ``category_id`` and
            optional ``iscrowd``. Pixels whose id is 0 or not listed are void; crowd regions are
            treated as void.
        pred_ids: [H, W] integer predicted segment-id map (0 = no region).
        pred_segments: predicted segments: dicts with ``id`` and contiguous ``category_id``.
            Pixels whose id is 0 or not listed belong to no region.
        num_classes: number of contiguous classes ``C``.
        normalize_by_image_size: divide both sums by the image's pixel count ``H * W``.

    Returns:
        (iou_sums, areas): float64 arrays of shape [C]: per class, ``sum_R |R| * max IoU`` and
        ``N_i = sum_R |R|`` over the image's non-crowd ground-truth regions, with ``|R|``
        counted without void and crowd pixels.
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"Ground truth {tuple(gt_ids.shape)} and prediction {tuple(pred_ids.shape)} "
            "have different shapes."
        )
    gt_seg_ids, gt_cats = _segment_table(gt_segments, num_classes, "ground-truth", True)
    pred_seg_ids, pred_cats = _segment_table(pred_segments, num_classes, "predicted", False)
    num_gt, num_pred = gt_seg_ids.size, pred_seg_ids.size

    gt_index = _index_map(gt_ids, gt_seg_ids)
    pred_index = _index_map(pred_ids, pred_seg_ids)
    # row 0 = void / crowd ground truth (dropped), column 0 = no predicted region
    joint = np.bincount(
        gt_index * (num_pred + 1) + pred_index, minlength=(num_gt + 1) * (num_pred + 1)
    ).reshape(num_gt + 1, num_pred + 1)[1:]
    gt_area = joint.sum(axis=1).astype(np.float64)  # [G]
    inter = joint[:, 1:].astype(np.float64)  # [G, P]
    pred_area = inter.sum(axis=0)  # [P], restricted to non-void, non-crowd pixels

    if num_gt > 0 and num_pred > 0:
        union = gt_area[:, None] + pred_area[None, :] - inter
        match = (gt_cats[:, None] == pred_cats[None, :]) & (inter > 0)
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=match)
        max_iou = iou.max(axis=1)
    else:
        max_iou = np.zeros(num_gt, dtype=np.float64)

    areas = np.bincount(gt_cats, weights=gt_area, minlength=num_classes).astype(np.float64)
    iou_sums = np.bincount(gt_cats, weights=gt_area * max_iou, minlength=num_classes)
    iou_sums = iou_sums.astype(np.float64)
    if normalize_by_image_size and gt_ids.size > 0:
        areas /= gt_ids.size
        iou_sums /= gt_ids.size
    return iou_sums, areas


def _mean(values: List[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def parsing_covering_from_stats(
    iou_sums: Sequence[float],
    areas: Sequence[float],
    thing_ids: Iterable[int] = (),
    class_names: Optional[Sequence[str]] = None,
) -> "OrderedDict[str, float]":
    """Parsing Covering from per-class sums accumulated over a dataset.

    Args:
        iou_sums: [C] per-class ``sum |R| * max IoU`` (see :func:`parsing_covering_stats`).
        areas: [C] per-class ``N_i = sum |R|``.
        thing_ids: contiguous ids of the thing classes; every other class is stuff.
        class_names: names of the ``C`` classes (default: the class index).

    Returns:
        OrderedDict with ``PC`` (mean covering over the classes with ``N_i > 0``), ``PC_th``,
        ``PC_st`` (the same over thing / stuff classes) and ``PC-<class name>`` for every class,
        all in percent; NaN where no class (or, per class, no ground truth) is present.
    """
    iou_sums = np.asarray(iou_sums, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    if iou_sums.shape != areas.shape or iou_sums.ndim != 1:
        raise ValueError(f"iou_sums {iou_sums.shape} and areas {areas.shape} must be equal [C].")
    num_classes = areas.size
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")
    things = set(int(i) for i in thing_ids)
    present = areas > 0
    covering = np.full(num_classes, np.nan)
    covering[present] = iou_sums[present] / areas[present]

    res = OrderedDict()
    res["PC"] = 100 * _mean([covering[i] for i in range(num_classes) if present[i]])
    res["PC_th"] = 100 * _mean(
        [covering[i] for i in range(num_classes) if present[i] and i in things]
    )
    res["PC_st"] = 100 * _mean(
        [covering[i] for i in range(num_classes) if present[i] and i not in things]
    )
    for name, cov in zip(class_names, covering):
        res[f"PC-{name}"] = 100 * float(cov)
    return res


def _rgb2id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic RGB PNG -> segment ids (``R + 256 G + 256^2 B``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class ParsingCoveringEvaluator(DatasetEvaluator):
    """Parsing Covering of panoptic predictions, on the ground truth of COCOPanopticEvaluator.

    The ground truth is the dataset's COCO-panoptic annotation (metadata ``panoptic_json`` and
    ``panoptic_root``); the predictions are ``outputs[i]["panoptic_seg"]`` as consumed by
    detectron2's ``COCOPanopticEvaluator``: ``(panoptic_img [H, W], segments_info)`` with
    contiguous ``category_id`` and ``isthing`` in ``segments_info`` (without ``isthing`` the
    ``category_id`` is taken as a dataset category id), or ``segments_info=None`` with
    ``panoptic_img = contiguous_category * label_divisor + instance`` and -1 for void.

    Per-image sums are accumulated in every process and summed in ``evaluate()``, which must be
    called from all workers and returns None except on the main process.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        normalize_by_image_size: bool = True,
    ):
        """
        Args:
            dataset_name: a dataset registered with COCO-panoptic metadata (``panoptic_json``,
                ``panoptic_root``, ``thing_dataset_id_to_contiguous_id``,
                ``stuff_dataset_id_to_contiguous_id``, ``stuff_classes``).
            output_dir: if given, ``parsing_covering.json`` is written there.
            normalize_by_image_size: divide every image's sums by its pixel count ``H * W``
                before accumulating them (DeepLab's default).
        """
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = output_dir
        self._normalize = normalize_by_image_size
        thing_map = dict(self._metadata.get("thing_dataset_id_to_contiguous_id", {}) or {})
        stuff_map = dict(self._metadata.get("stuff_dataset_id_to_contiguous_id", {}) or {})
        self._thing_contiguous_to_dataset = {v: k for k, v in thing_map.items()}
        self._stuff_contiguous_to_dataset = {v: k for k, v in stuff_map.items()}
        self._thing_contiguous_ids = set(thing_map.values())

        # Evaluation classes: with the COCO-panoptic convention (the stuff map covers all
        # categories) they are the stuff map's contiguous order; otherwise things, then stuff.
        stuff_names = list(self._metadata.get("stuff_classes", []) or [])
        thing_names = list(self._metadata.get("thing_classes", []) or [])

        def name_of(names: List[str], index: int, dataset_id: int) -> str:
            return str(names[index]) if 0 <= index < len(names) else str(dataset_id)

        if set(thing_map) <= set(stuff_map):
            order = sorted(stuff_map, key=stuff_map.get)
            names = [name_of(stuff_names, stuff_map[d], d) for d in order]
        else:
            things = sorted(thing_map, key=thing_map.get)
            stuffs = [d for d in sorted(stuff_map, key=stuff_map.get) if d not in thing_map]
            order = things + stuffs
            names = [name_of(thing_names, thing_map[d], d) for d in things]
            names += [name_of(stuff_names, stuff_map[d], d) for d in stuffs]
        self._dataset_to_class = {d: i for i, d in enumerate(order)}
        self._class_names = names
        self._thing_classes = [i for i, d in enumerate(order) if d in thing_map]
        self._gt_by_id: Optional[Dict[str, dict]] = None
        self._gt_by_file: Optional[Dict[str, dict]] = None
        self.reset()

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes."""
        return len(self._class_names)

    def reset(self):
        self._iou_sums = np.zeros(self.num_classes, dtype=np.float64)
        self._areas = np.zeros(self.num_classes, dtype=np.float64)
        self._num_images = 0

    def _load_annotations(self):
        with PathManager.open(self._metadata.panoptic_json, "r") as f:
            data = json.load(f)
        self._gt_by_id = {str(a["image_id"]): a for a in data.get("annotations", [])}
        self._gt_by_file = {a["file_name"]: a for a in data.get("annotations", [])}

    def _find_annotation(self, inp: dict) -> dict:
        if self._gt_by_id is None:
            self._load_annotations()
        ann = None
        if "image_id" in inp:
            ann = self._gt_by_id.get(str(inp["image_id"]))
        if ann is None and "file_name" in inp:
            # COCOPanopticEvaluator names a prediction after the input image's file name
            stem = os.path.splitext(os.path.basename(inp["file_name"]))[0]
            ann = self._gt_by_file.get(stem + ".png")
        if ann is None:
            raise KeyError(
                f"No panoptic annotation in {self._metadata.panoptic_json} for image_id "
                f"{inp.get('image_id')!r} / file_name {inp.get('file_name')!r}."
            )
        return ann

    def _load_ground_truth(self, ann: dict) -> Tuple[np.ndarray, List[dict]]:
        path = os.path.join(self._metadata.panoptic_root, ann["file_name"])
        with PathManager.open(path, "rb") as f:
            img = Image.open(f)
            gt_ids = _rgb2id(np.asarray(img.convert("RGB")))
        segments = []
        for seg in ann.get("segments_info", []):
            cat = seg["category_id"]
            if cat not in self._dataset_to_class:
                raise ValueError(
                    f"{ann['file_name']}: ground-truth segment {seg['id']} has unknown dataset "
                    f"category_id {cat}."
                )
            segments.append(
                {
                    "id": seg["id"],
                    "category_id": self._dataset_to_class[cat],
                    "iscrowd": seg.get("iscrowd", 0),
                }
            )
        return gt_ids, segments

    def _convert_prediction(self, panoptic_img, segments_info) -> Tuple[np.ndarray, List[dict]]:
        """Prediction -> (id map, segments with evaluation class ids), as COCOPanopticEvaluator."""
        if hasattr(panoptic_img, "cpu"):
            panoptic_img = panoptic_img.cpu().numpy()
        pred_ids = np.asarray(panoptic_img).astype(np.int64)
        if segments_info is None:
            # ids are contiguous_category * label_divisor + instance, -1 = void
            label_divisor = self._metadata.label_divisor
            segments_info = []
            for label in np.unique(pred_ids):
                if label == -1:
                    continue
                category = int(label) // label_divisor
                segments_info.append(
                    {
                        "id": int(label) + 1,
                        "category_id": category,
                        "isthing": category in self._thing_contiguous_ids,
                    }
                )
            pred_ids = pred_ids + 1  # 0 = void
        segments = []
        for seg in segments_info:
            isthing = seg.get("isthing", None)
            cat = seg["category_id"]
            if isthing is None:
                dataset_id = cat  # the model produced dataset category ids directly
            elif isthing:
                dataset_id = self._thing_contiguous_to_dataset.get(cat)
            else:
                dataset_id = self._stuff_contiguous_to_dataset.get(cat)
            if dataset_id not in self._dataset_to_class:
                raise ValueError(
                    f"Predicted segment {seg['id']} has unknown category_id {cat} "
                    f"(isthing={isthing})."
                )
            segments.append({"id": seg["id"], "category_id": self._dataset_to_class[dataset_id]})
        return pred_ids, segments

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs, with ``image_id`` and/or ``file_name``.
            outputs: the model's outputs, with ``panoptic_seg = (panoptic_img, segments_info)``.
        """
        for inp, out in zip(inputs, outputs):
            panoptic_img, segments_info = out["panoptic_seg"]
            pred_ids, pred_segments = self._convert_prediction(panoptic_img, segments_info)
            gt_ids, gt_segments = self._load_ground_truth(self._find_annotation(inp))
            iou_sums, areas = parsing_covering_stats(
                gt_ids, gt_segments, pred_ids, pred_segments, self.num_classes, self._normalize
            )
            self._iou_sums += iou_sums
            self._areas += areas
            self._num_images += 1

    def evaluate(self):
        """
        Returns:
            OrderedDict ``{"parsing_covering": {"PC", "PC_th", "PC_st", "PC-<class>", ...}}``
            (percent, NaN when undefined) on the main process, None elsewhere.
        """
        comm.synchronize()
        gathered = comm.gather((self._iou_sums, self._areas, self._num_images))
        if not comm.is_main_process():
            return None
        iou_sums = np.sum([g[0] for g in gathered], axis=0)
        areas = np.sum([g[1] for g in gathered], axis=0)
        num_images = int(sum(g[2] for g in gathered))
        if num_images == 0:
            logger.warning(f"[ParsingCoveringEvaluator] No image of {self._dataset_name} seen.")
        res = parsing_covering_from_stats(
            iou_sums, areas, self._thing_classes, class_names=self._class_names
        )
        self._log(res, areas, num_images)
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "parsing_covering.json")
            payload = {
                "parsing_covering": {k: _json_float(v) for k, v in res.items()},
                "num_images": num_images,
                "normalize_by_image_size": self._normalize,
                "per_class": [
                    {
                        "name": name,
                        "isthing": i in self._thing_classes,
                        "covering": _json_float(res[f"PC-{name}"]),
                        "iou_sum": float(iou_sums[i]),
                        "area": float(areas[i]),
                    }
                    for i, name in enumerate(self._class_names)
                ],
            }
            with PathManager.open(path, "w") as f:
                json.dump(payload, f, indent=2)
        return OrderedDict({"parsing_covering": dict(res)})

    def _log(self, res: Dict[str, float], areas: np.ndarray, num_images: int):
        from tabulate import tabulate

        rows = [
            [name, "thing" if i in self._thing_classes else "stuff", res[f"PC-{name}"]]
            for i, name in enumerate(self._class_names)
            if areas[i] > 0
        ]
        # two (category, type, PC) column groups side by side
        half = (len(rows) + 1) // 2
        table_rows = [
            list(itertools.chain(*pair))
            for pair in itertools.zip_longest(rows[:half], rows[half:], fillvalue=["", "", ""])
        ]
        per_class = tabulate(
            table_rows,
            headers=["category", "type", "PC"] * 2,
            tablefmt="pipe",
            floatfmt=".2f",
            numalign="left",
        )
        summary = tabulate(
            [[res["PC"], res["PC_th"], res["PC_st"], num_images]],
            headers=["PC", "PC_th", "PC_st", "#images"],
            tablefmt="pipe",
            floatfmt=".3f",
            numalign="center",
        )
        norm = "per-image normalized" if self._normalize else "pixel sums"
        logger.info(
            f"Parsing Covering on {self._dataset_name} ({norm}):\n{summary}\n"
            f"Per-class covering (classes present in the ground truth):\n{per_class}"
        )


def _json_float(value: float) -> Optional[float]:
    """NaN -> None, for strict JSON."""
    return None if math.isnan(value) else float(value)
