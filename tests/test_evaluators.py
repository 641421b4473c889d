"""The evaluators train_net.py builds give defined numbers on empty predictions and on images
without things (no crash)."""

import math

import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from deeperlab_d2.evaluation import build_evaluator


def empty_output(h, w, num_classes=7):
    inst = Instances((h, w))
    inst.pred_masks = torch.zeros(0, h, w, dtype=torch.bool)
    inst.pred_boxes = Boxes(torch.zeros(0, 4))
    inst.pred_classes = torch.zeros(0, dtype=torch.long)
    inst.scores = torch.zeros(0)
    return {
        "sem_seg": torch.zeros(num_classes, h, w),
        "panoptic_seg": (torch.zeros(h, w, dtype=torch.int32), []),
        "instances": inst,
    }


def test_evaluators_chosen_from_evaluator_type(synthetic_root, tmp_path):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path))
    evaluator = build_evaluator(cfg, "test_synth_val")
    names = sorted(type(e).__name__ for e in evaluator._evaluators)
    assert names == [
        "COCOEvaluator",
        "COCOPanopticEvaluator",
        "ParsingCoveringEvaluator",
        "SemSegEvaluator",
    ]
    MetadataCatalog.get("test_no_evaluator_type")  # metadata without evaluator_type
    try:
        build_evaluator(cfg, "test_no_evaluator_type")
        raise AssertionError("expected NotImplementedError")
    except NotImplementedError as e:
        assert "test_no_evaluator_type" in str(e)


def test_empty_predictions_give_defined_numbers(synthetic_root, tmp_path):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path))
    evaluator = build_evaluator(cfg, "test_synth_val")
    evaluator.reset()
    for rec in DatasetCatalog.get("test_synth_val"):
        inputs = [{"file_name": rec["file_name"], "image_id": rec["image_id"]}]
        evaluator.process(inputs, [empty_output(192, 256)])
    results = evaluator.evaluate()
    assert results["panoptic_seg"]["PQ"] == 0.0
    assert results["parsing_covering"]["PC"] == 0.0
    assert results["sem_seg"]["mIoU"] >= 0.0  # everything predicted as class 0
    assert math.isnan(results["segm"]["AP"])  # no detections: COCO's "undefined"


def test_prediction_without_things(synthetic_root, tmp_path):
    """A prediction with only (perfect) stuff segments: PC_st is 100 and PC_th is defined (0).
    Ground truth without things is covered in test_parsing_covering.py."""
    from deeperlab_d2.evaluation import ParsingCoveringEvaluator

    rec = DatasetCatalog.get("test_synth_val")[0]
    evaluator = ParsingCoveringEvaluator("test_synth_val", str(tmp_path))
    evaluator.reset()
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(rec["pan_seg_file_name"]), dtype=np.int64)
    gt = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    stuff = [s for s in rec["segments_info"] if not s["isthing"]]
    pred = torch.zeros(gt.shape, dtype=torch.int32)
    segments = []
    for i, s in enumerate(stuff, start=1):
        pred[torch.from_numpy(gt == s["id"])] = i
        segments.append({"id": i, "category_id": s["category_id"], "isthing": False})
    evaluator.process(
        [{"file_name": rec["file_name"], "image_id": rec["image_id"]}],
        [{"panoptic_seg": (pred, segments)}],
    )
    res = evaluator.evaluate()["parsing_covering"]
    assert res["PC_st"] == 100.0
    assert res["PC_th"] == 0.0


def test_summary_table_one_row_per_dataset():
    from deeperlab_d2.evaluation import summary_table

    single = {"panoptic_seg": {"PQ": 61.234, "SQ": 80.0}, "parsing_covering": {"PC": 75.5}}
    lines = summary_table(single).splitlines()
    assert lines[0].startswith("| dataset | PQ | SQ | RQ |")
    assert lines[2] == "|  | 61.23 | 80.00 | - | - | - | 75.50 | - | - | - | - | - |"
    multi = summary_table({"a": single, "b": {"sem_seg": {"mIoU": 1.0}}}).splitlines()
    assert len(multi) == 4 and multi[3].startswith("| b | - |")
