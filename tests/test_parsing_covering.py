"""Parsing Covering: hand-computed values of the pure function and the evaluator end to end."""

import json
import math
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from PIL import Image

from deeperlab_d2.evaluation import (
    ParsingCoveringEvaluator,
    parsing_covering_from_stats,
    parsing_covering_stats,
)


def seg(seg_id, cat, iscrowd=0):
    return {"id": seg_id, "category_id": cat, "iscrowd": iscrowd}


def pc(gt_ids, gt_segs, pred_ids, pred_segs, num_classes, thing_ids=(), normalize=True):
    sums, areas = parsing_covering_stats(
        np.asarray(gt_ids), gt_segs, np.asarray(pred_ids), pred_segs, num_classes, normalize
    )
    return parsing_covering_from_stats(sums, areas, thing_ids)


def test_perfect_prediction_is_100():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    gt_segs = [seg(1, 0), seg(2, 0), seg(3, 1)]  # class 0 = thing (2 instances), 1 = stuff
    pred = gt * 10 + 7  # other ids, same regions
    pred_segs = [{"id": 17, "category_id": 0}, {"id": 27, "category_id": 0}]
    pred_segs.append({"id": 37, "category_id": 1})
    res = pc(gt, gt_segs, pred, pred_segs, 2, thing_ids=[0])
    assert res["PC"] == pytest.approx(100.0)
    assert res["PC_th"] == pytest.approx(100.0)
    assert res["PC_st"] == pytest.approx(100.0)
    assert res["PC-0"] == pytest.approx(100.0) and res["PC-1"] == pytest.approx(100.0)


def test_region_split_in_two_predictions():
    gt = np.ones((4, 4), dtype=np.int64)
    pred = np.ones((4, 4), dtype=np.int64)
    pred.reshape(-1)[10:] = 2  # 10 / 6 pixels
    res = pc(gt, [seg(1, 0)], pred, [seg(1, 0), seg(2, 0)], 1)
    # max IoU = max(10/16, 6/16) = 0.625
    assert res["PC"] == pytest.approx(62.5)
    assert res["PC-0"] == pytest.approx(62.5)


def test_wrong_class_and_absent_class_not_averaged():
    gt = np.array([[1, 1, 2, 2]] * 4)  # class 0 left, class 1 right
    pred = np.array([[1, 1, 2, 2]] * 4)
    # right half predicted as class 2 (absent from the ground truth): class 1 gets 0
    res = pc(gt, [seg(1, 0), seg(2, 1)], pred, [seg(1, 0), seg(2, 2)], 3, thing_ids=[2])
    assert res["PC-0"] == pytest.approx(100.0)
    assert res["PC-1"] == pytest.approx(0.0)
    assert math.isnan(res["PC-2"])  # not in the ground truth
    assert res["PC"] == pytest.approx(50.0)  # (100 + 0) / 2, class 2 not averaged in
    assert res["PC_st"] == pytest.approx(50.0)
    assert math.isnan(res["PC_th"])  # the only thing class has no ground truth


def test_void_pixels_are_not_penalized():
    # left two columns: class 0 (id 1); right: void (id 0) and an unlisted id (9) -> void too
    gt = np.array([[1, 1, 0, 9]] * 4)
    pred = np.full((4, 4), 5)  # one class-0 region over the whole image (16 px)
    sums, areas = parsing_covering_stats(gt, [seg(1, 0)], pred, [seg(5, 0)], 1, False)
    # predicted area restricted to non-void pixels = 8 -> IoU = 8 / 8
    assert areas[0] == pytest.approx(8.0) and sums[0] == pytest.approx(8.0)
    assert pc(gt, [seg(1, 0)], pred, [seg(5, 0)], 1)["PC"] == pytest.approx(100.0)
    # predicted pixels with id 0 or an unlisted id belong to no region
    pred2 = np.array([[5, 0, 5, 5], [5, 3, 5, 5], [5, 5, 5, 5], [5, 5, 5, 5]])
    # region 5 covers 6 of the 8 ground-truth pixels: IoU = 6 / 8
    assert pc(gt, [seg(1, 0)], pred2, [seg(5, 0)], 1)["PC"] == pytest.approx(75.0)


def test_crowd_region_is_ignored():
    gt = np.array([[1, 1, 2, 2]] * 4)  # id 2: crowd region of class 0
    pred = np.full((4, 4), 4)
    gt_segs = [seg(1, 0), seg(2, 0, iscrowd=1)]
    sums, areas = parsing_covering_stats(gt, gt_segs, pred, [seg(4, 0)], 1, True)
    # |R| = 8 (the crowd is not a region), pred area = 8 (crowd pixels left out) -> IoU 1;
    # normalized by H * W = 16
    assert areas[0] == pytest.approx(0.5) and sums[0] == pytest.approx(0.5)
    assert pc(gt, gt_segs, pred, [seg(4, 0)], 1)["PC"] == pytest.approx(100.0)
    # a class present only as crowd is absent
    only_crowd = [seg(1, 0), seg(2, 1, iscrowd=1)]
    res = pc(gt, only_crowd, pred, [seg(4, 0)], 2)
    assert math.isnan(res["PC-1"]) and res["PC"] == pytest.approx(100.0)


def test_empty_prediction_scores_zero():
    gt = np.array([[1, 1, 2, 2]] * 4)
    gt_segs = [seg(1, 0), seg(2, 1)]
    for pred, pred_segs in [(np.zeros((4, 4)), []), (np.full((4, 4), 3), [])]:
        res = pc(gt, gt_segs, pred, pred_segs, 3)
        assert res["PC"] == 0.0 and res["PC-0"] == 0.0 and res["PC-1"] == 0.0
        assert math.isnan(res["PC-2"])
    # listed segments that cover no pixel
    res = pc(gt, gt_segs, np.zeros((4, 4)), [seg(5, 0), seg(6, 1)], 3)
    assert res["PC"] == 0.0


def _two_images():
    # Image A, 4x4 (16 px), class 0: R1 = rows 0-2 (12 px), R2 = row 3 (4 px).
    # Prediction: R1 exactly (IoU 1); 2 px of R2 as class 0 (IoU 2/4), 2 px as class 1.
    # -> sum |R| * maxIoU = 12 * 1 + 4 * 0.5 = 14, sum |R| = 16.
    gt_a = np.array([[1] * 4] * 3 + [[2] * 4])
    pred_a = np.array([[1] * 4] * 3 + [[2, 2, 3, 3]])
    a = (gt_a, [seg(1, 0), seg(2, 0)], pred_a, [seg(1, 0), seg(2, 0), seg(3, 1)])
    # Image B, 2x4 (8 px), class 0: one region of 8 px, predicted as 6 px + 2 px (class 0).
    # -> sum |R| * maxIoU = 8 * 6/8 = 6, sum |R| = 8.
    gt_b = np.ones((2, 4), dtype=np.int64)
    pred_b = np.array([[1, 1, 1, 1], [1, 1, 2, 2]])
    b = (gt_b, [seg(1, 0)], pred_b, [seg(1, 0), seg(2, 0)])
    return a, b


def test_area_weighted_mean_single_image():
    a, _ = _two_images()
    assert pc(*a, 2)["PC"] == pytest.approx(100 * 14 / 16)  # 87.5 (class 1 not in the GT)


@pytest.mark.parametrize(
    "normalize, expected",
    [
        # plain sums: (14 + 6) / (16 + 8) = 20 / 24
        (False, 100 * 20 / 24),
        # per image / H*W: (14/16 + 6/8) / (16/16 + 8/8) = (0.875 + 0.75) / 2 = 0.8125
        (True, 81.25),
    ],
)
def test_two_images_accumulated(normalize, expected):
    sums, areas = np.zeros(2), np.zeros(2)
    for image in _two_images():
        s, ar = parsing_covering_stats(*image, 2, normalize_by_image_size=normalize)
        sums, areas = sums + s, areas + ar
    res = parsing_covering_from_stats(sums, areas, thing_ids=[0], class_names=["car", "sky"])
    assert res["PC"] == pytest.approx(expected)
    assert res["PC-car"] == pytest.approx(expected)
    assert res["PC_th"] == pytest.approx(expected)
    assert math.isnan(res["PC_st"]) and math.isnan(res["PC-sky"])


def _random_case(rng, h=24, w=20, num_classes=4):
    gt = (np.arange(h)[:, None] // 6) * 4 + np.arange(w)[None, :] // 5  # 16 blocks
    gt_segs = [
        seg(i, int(rng.integers(num_classes)), int(rng.random() < 0.1)) for i in range(1, 16)
    ]
    gt[rng.random((h, w)) < 0.05] = 0  # void
    pred = rng.integers(1, 12, size=(h, w)) * (rng.random((h, w)) < 0.2)
    pred = np.where(pred > 0, pred, np.roll(gt, 2, axis=1) + 1)
    pred_segs = [{"id": i, "category_id": int(rng.integers(num_classes))} for i in range(1, 17)]
    return gt, gt_segs, pred, pred_segs


def _reference_stats(gt, gt_segs, pred, pred_segs, num_classes):
    """Direct, mask-based reference (plain sums)."""
    valid = np.zeros(gt.shape, bool)
    for s in gt_segs:
        if not s.get("iscrowd", 0):
            valid |= gt == s["id"]
    sums, areas = np.zeros(num_classes), np.zeros(num_classes)
    for s in gt_segs:
        if s.get("iscrowd", 0):
            continue
        region = gt == s["id"]
        best = 0.0
        for p in pred_segs:
            if p["category_id"] != s["category_id"]:
                continue
            pr = (pred == p["id"]) & valid
            union = (region | pr).sum()
            if union:
                best = max(best, (region & pr).sum() / union)
        areas[s["category_id"]] += region.sum()
        sums[s["category_id"]] += region.sum() * best
    return sums, areas


def test_matches_reference_and_invariant_to_renumbering():
    rng = np.random.default_rng(0)
    for _ in range(3):
        gt, gt_segs, pred, pred_segs = _random_case(rng)
        sums, areas = parsing_covering_stats(gt, gt_segs, pred, pred_segs, 4, False)
        ref_sums, ref_areas = _reference_stats(gt, gt_segs, pred, pred_segs, 4)
        np.testing.assert_allclose(sums, ref_sums)
        np.testing.assert_allclose(areas, ref_areas)

        # permute the predicted ids (to large RGB-like ids) and the segment order
        new_ids = rng.permutation(16) * 65536 + 1000
        lut = np.zeros(17, dtype=np.int64)
        lut[1:] = new_ids
        pred2 = lut[pred]
        pred_segs2 = [{"id": int(lut[p["id"]]), "category_id": p["category_id"]} for p in pred_segs]
        pred_segs2 = [pred_segs2[i] for i in rng.permutation(len(pred_segs2))]
        sums2, areas2 = parsing_covering_stats(gt, gt_segs, pred2, pred_segs2, 4, False)
        np.testing.assert_allclose(sums2, sums)
        np.testing.assert_allclose(areas2, areas)
        res, res2 = (parsing_covering_from_stats(s, areas, [1]) for s in (sums, sums2))
        assert res == pytest.approx(res2, nan_ok=True)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        parsing_covering_stats(np.ones((2, 2)), [seg(1, 0)], np.ones((2, 3)), [], 1)
    with pytest.raises(ValueError):
        parsing_covering_stats(np.ones((2, 2)), [seg(1, 5)], np.ones((2, 2)), [], 1)
    res = parsing_covering_from_stats(np.zeros(2), np.zeros(2))
    assert all(math.isnan(v) for v in res.values())


# --------------------------------------------------------------------------------------------
# Evaluator end to end on a tiny COCO-panoptic dataset
# --------------------------------------------------------------------------------------------

# dataset category ids (non-contiguous): road 3 (stuff), person 7 (thing), sky 12 (stuff)
CATEGORIES = [
    {"id": 3, "name": "road", "isthing": 0},
    {"id": 7, "name": "person", "isthing": 1},
    {"id": 12, "name": "sky", "isthing": 0},
]
STUFF_MAP = {3: 0, 7: 1, 12: 2}  # COCO-panoptic convention: all classes
THING_MAP = {7: 1}
ROAD, PERSON, SKY = 0, 1, 2  # contiguous

# image "a" (4x6): sky 300, person 5000, crowd person 6000, road 77, void 0
GT_A = np.array(
    [
        [300, 300, 300, 300, 300, 300],
        [300, 300, 5000, 5000, 6000, 6000],
        [77, 77, 5000, 5000, 0, 0],
        [77, 77, 77, 77, 77, 77],
    ]
)
SEGS_A = [
    {"id": 300, "category_id": 12, "iscrowd": 0},
    {"id": 5000, "category_id": 7, "iscrowd": 0},
    {"id": 6000, "category_id": 7, "iscrowd": 1},
    {"id": 77, "category_id": 3, "iscrowd": 0},
]
# image "b" (3x5): stuff only
GT_B = np.array([[2] * 5, [1] * 5, [1] * 5])
SEGS_B = [{"id": 1, "category_id": 3, "iscrowd": 0}, {"id": 2, "category_id": 12, "iscrowd": 0}]


def _contiguous(segs):
    return [
        seg(s["id"], STUFF_MAP[s["category_id"]], s["iscrowd"]) for s in segs
    ]  # ground truth in contiguous ids, for the pure function


@pytest.fixture
def tiny_dataset(tmp_path):
    from panopticapi.utils import id2rgb

    root = tmp_path / "panoptic"
    root.mkdir()
    images, annotations = [], []
    for image_id, stem, gt, segs in [(101, "a", GT_A, SEGS_A), (102, "b", GT_B, SEGS_B)]:
        Image.fromarray(id2rgb(gt)).save(root / f"{stem}.png")
        h, w = gt.shape
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segs}
        )
    json_path = tmp_path / "panoptic.json"
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    name = f"test_pc_{uuid.uuid4().hex}"
    MetadataCatalog.get(name).set(
        panoptic_json=str(json_path),
        panoptic_root=str(root),
        thing_dataset_id_to_contiguous_id=THING_MAP,
        stuff_dataset_id_to_contiguous_id=STUFF_MAP,
        stuff_classes=["road", "person", "sky"],
        thing_classes=["person"],
        label_divisor=1000,
    )
    yield name
    MetadataCatalog.remove(name)


def _inputs(image_id, stem):
    return [{"image_id": image_id, "file_name": f"/some/dir/{stem}.jpg"}]


def _outputs(pan, segments_info):
    return [{"panoptic_seg": (torch.as_tensor(np.asarray(pan), dtype=torch.int32), segments_info)}]


# perfect predictions: crowd and void pixels of "a" predicted as road (not penalized)
PERFECT_A = np.array([[1] * 6, [1, 1, 2, 2, 3, 3], [3, 3, 2, 2, 3, 3], [3] * 6])
PERFECT_A_SEGS = [
    {"id": 1, "category_id": SKY, "isthing": False},
    {"id": 2, "category_id": PERSON, "isthing": True},
    {"id": 3, "category_id": ROAD, "isthing": False},
]
PERFECT_B = np.array([[8] * 5, [9] * 5, [9] * 5])
PERFECT_B_SEGS = [
    {"id": 8, "category_id": SKY, "isthing": False},
    {"id": 9, "category_id": ROAD, "isthing": False},
]


def test_evaluator_perfect_prediction(tiny_dataset, tmp_path):
    out_dir = tmp_path / "eval"
    ev = ParsingCoveringEvaluator(tiny_dataset, output_dir=str(out_dir))
    ev.reset()
    ev.process(_inputs(101, "a"), _outputs(PERFECT_A, PERFECT_A_SEGS))
    ev.process(_inputs(102, "b"), _outputs(PERFECT_B, PERFECT_B_SEGS))
    res = ev.evaluate()["parsing_covering"]
    for key in ["PC", "PC_th", "PC_st", "PC-road", "PC-person", "PC-sky"]:
        assert res[key] == pytest.approx(100.0), key
    saved = json.loads((out_dir / "parsing_covering.json").read_text())
    assert saved["parsing_covering"]["PC"] == pytest.approx(100.0)
    assert saved["num_images"] == 2

    # segments_info=None: ids = contiguous category * label_divisor + instance, -1 = void
    pan = np.array([[2000] * 6, [2000, 2000, 1001, 1001, -1, -1], [0, 0, 1001, 1001, 0, 0]])
    pan = np.concatenate([pan, np.zeros((1, 6), dtype=np.int64)])
    ev.reset()
    ev.process(_inputs(101, "a"), _outputs(pan, None))
    res = ev.evaluate()["parsing_covering"]
    assert res["PC"] == pytest.approx(100.0) and res["PC_th"] == pytest.approx(100.0)
    assert res["PC-sky"] == pytest.approx(100.0) and res["PC-road"] == pytest.approx(100.0)


def test_evaluator_matches_pure_function(tiny_dataset):
    # person split (3 of its 4 px), a sky pixel predicted as road, crowd pixels as person
    pred_a = np.array([[1] * 5 + [3], [1, 1, 2, 2, 2, 2], [3, 3, 2, 4, 0, 0], [3] * 6])
    segs_a = PERFECT_A_SEGS + [{"id": 4, "category_id": PERSON, "isthing": True}]
    pred_b = np.array([[8] * 5, [9, 9, 8, 8, 8], [9] * 5])
    for normalize in (True, False):
        ev = ParsingCoveringEvaluator(tiny_dataset, normalize_by_image_size=normalize)
        ev.reset()
        ev.process(_inputs(101, "a"), _outputs(pred_a, segs_a))
        # image_id unknown: found by file name, as COCOPanopticEvaluator does
        ev.process(_inputs("unknown", "b"), _outputs(pred_b, PERFECT_B_SEGS))
        res = ev.evaluate()["parsing_covering"]

        sums, areas = np.zeros(3), np.zeros(3)
        for gt, gsegs, pred, psegs in [
            (GT_A, SEGS_A, pred_a, segs_a),
            (GT_B, SEGS_B, pred_b, PERFECT_B_SEGS),
        ]:
            s, ar = parsing_covering_stats(gt, _contiguous(gsegs), pred, psegs, 3, normalize)
            sums, areas = sums + s, areas + ar
        expected = parsing_covering_from_stats(sums, areas, [PERSON], ["road", "person", "sky"])
        assert res == pytest.approx(dict(expected))
        assert res["PC-person"] == pytest.approx(75.0)  # 3 / (4 + 3 - 3) on the only person


def test_evaluator_degenerate_cases(tiny_dataset):
    ev = ParsingCoveringEvaluator(tiny_dataset)
    ev.reset()
    res = ev.evaluate()["parsing_covering"]  # nothing processed
    assert all(math.isnan(v) for v in res.values())

    # an image without things: PC_th undefined, the rest defined
    ev.reset()
    ev.process(_inputs(102, "b"), _outputs(PERFECT_B, PERFECT_B_SEGS))
    res = ev.evaluate()["parsing_covering"]
    assert math.isnan(res["PC_th"]) and math.isnan(res["PC-person"])
    assert res["PC"] == pytest.approx(100.0) and res["PC_st"] == pytest.approx(100.0)

    # empty segments_info: 0 for every class present
    ev.reset()
    ev.process(_inputs(101, "a"), _outputs(np.zeros((4, 6)), []))
    res = ev.evaluate()["parsing_covering"]
    assert res["PC"] == 0.0 and res["PC_th"] == 0.0 and res["PC_st"] == 0.0

    with pytest.raises(KeyError):
        ev.process(_inputs(999, "nope"), _outputs(np.zeros((4, 6)), []))
