"""COCO 2017 panoptic and Cityscapes panoptic (detectron2's builtin names) on fake miniatures of
their real on-disk layouts under ``$DETECTRON2_DATASETS``: loading, the DeeperLab mapper's
targets, a training step of a tiny model and ``--eval-only`` evaluation with every evaluator the
plugin builds for them. Also ``datasets/prepare_coco_semantic_from_panoptic.py``.

Detectron2 registers its builtin datasets when it is imported, with the root read then; the
fixtures re-register the names used here for the temporary root (as detectron2's builtin.py
does) and restore the original registrations afterwards.
"""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, load_repo_module, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image
from pycocotools import mask as mask_util

from deeperlab_d2.data import DeeperLabDatasetMapper
from deeperlab_d2.evaluation import build_evaluator

HEIGHT, WIDTH = 64, 128
prepare = load_repo_module("datasets/prepare_coco_semantic_from_panoptic.py")

# COCO: real dataset ids -> detectron2's contiguous ids of coco_2017_*_panoptic
COCO_PERSON, COCO_CAR, COCO_ROAD, COCO_SKY = 1, 3, 149, 187
COCO_CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
# Cityscapes: label ids (the panoptic json's category ids) -> train ids
CS_ROAD, CS_SKY, CS_PERSON, CS_CAR = 7, 23, 24, 26
CS_TRAIN_ID = {CS_ROAD: 0, CS_SKY: 10, CS_PERSON: 11, CS_CAR: 13}
CS_CITIES = {"train": ["aachen"], "val": ["frankfurt"]}


def _paint(rng, stuff, things, crowd=None):
    """A fake panoptic annotation: two stuff regions split by a horizon (a void band between
    them), rectangles of things, optionally a crowd segment.

    Args:
        stuff: (top, bottom) as (segment id, category id).
        things: [(segment id, category id)].
        crowd: optional (segment id, category id), iscrowd=1.

    Returns:
        (ids (H, W) int64, segments_info of the present segments).
    """
    pan = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    horizon = int(rng.integers(24, 36))
    pan[:horizon] = stuff[0][0]
    pan[horizon + 1 :] = stuff[1][0]
    listed = [(*stuff[0], 0), (*stuff[1], 0)]
    for i, (seg_id, cat) in enumerate(things):
        y, x = int(rng.integers(4, HEIGHT - 24)), 8 + 36 * i + int(rng.integers(0, 6))
        pan[y : y + int(rng.integers(12, 20)), x : x + int(rng.integers(10, 20))] = seg_id
        listed.append((seg_id, cat, 0))
    if crowd is not None:
        pan[HEIGHT - 8 :, WIDTH - 16 :] = crowd[0]
        listed.append((*crowd, 1))
    segments = []
    for seg_id, cat, iscrowd in listed:
        ys, xs = np.nonzero(pan == seg_id)
        if len(ys):
            x0, y0 = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
            segments.append(
                {
                    "id": int(seg_id),
                    "category_id": cat,
                    "iscrowd": iscrowd,
                    "area": len(ys),
                    "bbox": [x0, y0, w, h],
                }
            )
    return pan, segments


def _save_pan(pan, path):
    rgb = np.stack([pan % 256, pan // 256 % 256, pan // 256**2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _expected_semantic(pan, segments, id_map):
    labels = np.full(pan.shape, 255, dtype=np.uint8)
    for s in segments:
        if not s["iscrowd"]:
            labels[pan == s["id"]] = id_map[s["category_id"]]
    return labels


def make_fake_coco(root: Path) -> dict:
    """``root/coco`` as the COCO downloads unzip: images, panoptic PNGs + json, instances json.
    Returns split -> {png name: expected semantic labels}."""
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    expected = {}
    for s, split in enumerate(("train", "val")):
        (coco / f"{split}2017").mkdir()
        (coco / f"panoptic_{split}2017").mkdir()
        images, annotations, instances, expected[split] = [], [], [], {}
        for i in range(2):
            image_id = 139 + 1000 * s + 7 * i
            rng = np.random.default_rng([s, i])
            pan, segments = _paint(
                rng,
                stuff=[(5_000_000 + i, COCO_SKY), (7_000_000, COCO_ROAD)],
                things=[(101, COCO_PERSON), (202, COCO_CAR), (303, COCO_PERSON)],
                crowd=(404, COCO_PERSON) if i == 0 else None,
            )
            stem = f"{image_id:012d}"
            _save_pan(pan, coco / f"panoptic_{split}2017" / f"{stem}.png")
            photo = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(photo).save(coco / f"{split}2017" / f"{stem}.jpg")
            images.append(
                {"id": image_id, "file_name": f"{stem}.jpg", "height": HEIGHT, "width": WIDTH}
            )
            annotations.append(
                {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}
            )
            for seg in segments:
                if seg["category_id"] in (COCO_PERSON, COCO_CAR):
                    rle = mask_util.encode(np.asfortranarray((pan == seg["id"]).astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    instances.append(
                        {
                            **seg,
                            "image_id": image_id,
                            "segmentation": rle,
                            "id": len(instances) + 1,
                        }
                    )
            expected[split][f"{stem}.png"] = _expected_semantic(pan, segments, COCO_CONTIGUOUS)
        categories = [dict(c) for c in COCO_CATEGORIES]  # all 133, as in the real json
        for name, data in (
            (f"panoptic_{split}2017.json", {"annotations": annotations, "categories": categories}),
            (
                f"instances_{split}2017.json",
                {"annotations": instances, "categories": [c for c in categories if c["isthing"]]},
            ),
        ):
            with open(coco / "annotations" / name, "w") as f:
                json.dump({"info": {}, "licenses": [], "images": images, **data}, f)
    return expected


def make_fake_cityscapes(root: Path) -> None:
    """``root/cityscapes`` as the downloads + cityscapesScripts' createTrainIdLabelImgs and
    createPanopticImgs leave it."""
    cs = root / "cityscapes"
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "color": c["color"],
            "supercategory": "x",
            "isthing": c["isthing"],
        }
        for c in _cityscapes_categories()
    ]
    for s, split in enumerate(("train", "val")):
        pan_dir = cs / "gtFine" / f"cityscapes_panoptic_{split}"
        pan_dir.mkdir(parents=True)
        images, annotations = [], []
        for city in CS_CITIES[split]:
            (cs / "leftImg8bit" / split / city).mkdir(parents=True)
            (cs / "gtFine" / split / city).mkdir(parents=True)
            for i in range(2):
                image_id = f"{city}_{i:06d}_000019"
                rng = np.random.default_rng([7, s, i])
                # createPanopticImgs: stuff id = label id, thing id = label id * 1000 + instance,
                # a thing group without instances (crowd) = label id
                pan, segments = _paint(
                    rng,
                    stuff=[(CS_SKY, CS_SKY), (CS_ROAD, CS_ROAD)],
                    things=[(CS_PERSON * 1000, CS_PERSON), (CS_CAR * 1000 + 1, CS_CAR)],
                    crowd=(CS_CAR, CS_CAR) if i == 1 else None,
                )
                _save_pan(pan, pan_dir / f"{image_id}_gtFine_panoptic.png")
                photo = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
                Image.fromarray(photo).save(
                    cs / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png"
                )
                label_ids = np.where(pan >= 1000, pan // 1000, pan).astype(np.uint8)
                train_ids = np.full_like(label_ids, 255)
                for label, train in CS_TRAIN_ID.items():
                    train_ids[label_ids == label] = train
                gt = cs / "gtFine" / split / city
                Image.fromarray(label_ids).save(gt / f"{image_id}_gtFine_labelIds.png")
                Image.fromarray(train_ids).save(gt / f"{image_id}_gtFine_labelTrainIds.png")
                Image.fromarray(pan.astype(np.int32)).save(
                    gt / f"{image_id}_gtFine_instanceIds.png"
                )
                images.append(
                    {
                        "id": image_id,
                        "file_name": f"{image_id}_leftImg8bit.png",
                        "height": HEIGHT,
                        "width": WIDTH,
                    }
                )
                annotations.append(
                    {
                        "image_id": image_id,
                        "file_name": f"{image_id}_gtFine_panoptic.png",
                        "segments_info": segments,
                    }
                )
        with open(cs / "gtFine" / f"cityscapes_panoptic_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _cityscapes_categories():
    from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES

    return CITYSCAPES_CATEGORIES


@contextlib.contextmanager
def _registered_under(root: Path, names, register):
    """Replace the registrations of ``names`` by ``register(root)`` with
    ``$DETECTRON2_DATASETS=root``; restore the original ones on exit."""
    saved = {}
    for name in names:
        saved[name] = (DatasetCatalog.pop(name, None), MetadataCatalog.pop(name, None))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DETECTRON2_DATASETS", str(root))
            register(os.environ["DETECTRON2_DATASETS"])
            yield
    finally:
        for name, (func, meta) in saved.items():
            DatasetCatalog.pop(name, None)
            MetadataCatalog.pop(name, None)
            if func is not None:
                DatasetCatalog[name] = func
            if meta is not None:
                MetadataCatalog[name] = meta


COCO_NAMES = [
    f"coco_2017_{split}_panoptic{suffix}"
    for split in ("train", "val")
    for suffix in ("", "_with_sem_seg")
]
CITYSCAPES_NAMES = ["cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val"]


def _register_coco(root: str) -> None:
    """What detectron2's builtin.py does for ``coco_2017_{train,val}_panoptic`` (the image folder
    and instances json come from the ``coco_2017_{train,val}`` instance splits), plus
    deeperlab_d2's ``_with_sem_seg`` names."""
    from detectron2.data.datasets.builtin import (
        _PREDEFINED_SPLITS_COCO,
        _PREDEFINED_SPLITS_COCO_PANOPTIC,
    )
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
    from detectron2.data.datasets.coco_panoptic import register_coco_panoptic

    from deeperlab_d2.data.datasets import register_coco_panoptic_with_sem_seg

    for split in ("train", "val"):
        name = f"coco_2017_{split}_panoptic"
        panoptic_root, panoptic_json, _ = _PREDEFINED_SPLITS_COCO_PANOPTIC[name]
        image_root, instances_json = _PREDEFINED_SPLITS_COCO["coco"][f"coco_2017_{split}"]
        register_coco_panoptic(
            name,
            _get_builtin_metadata("coco_panoptic_standard"),
            os.path.join(root, image_root),
            os.path.join(root, panoptic_root),
            os.path.join(root, panoptic_json),
            os.path.join(root, instances_json),
        )
    register_coco_panoptic_with_sem_seg(root)


def _register_cityscapes(root: str) -> None:
    from detectron2.data.datasets.cityscapes_panoptic import register_all_cityscapes_panoptic

    register_all_cityscapes_panoptic(root)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_root")
    expected = make_fake_coco(root)
    stats = prepare.prepare_coco(str(root), workers=1, verbose=False)
    assert stats == {s: {"converted": 2, "skipped": 0} for s in ("train", "val")}
    with _registered_under(root, COCO_NAMES, _register_coco):
        yield root, expected


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes_root")
    make_fake_cityscapes(root)
    with _registered_under(root, CITYSCAPES_NAMES, _register_cityscapes):
        yield root


def test_prepare_coco_semantic_pngs(coco_root, tmp_path):
    root, expected = coco_root
    labels = set()
    for split, per_png in expected.items():
        for png, want in per_png.items():
            with Image.open(root / "coco" / f"panoptic_semseg_{split}2017" / png) as im:
                assert im.mode == "L"
                np.testing.assert_array_equal(np.asarray(im), want, err_msg=f"{split}/{png}")
            labels |= set(np.unique(want).tolist())
    # person 0, car 2, road 100, sky 119 (detectron2's ids), void and crowd 255
    assert labels == {0, 2, 100, 119, 255}
    # a rerun keeps existing files; the CLI rewrites them with --overwrite (the parallel CLI runs
    # in test_custom_dataset.py: a script loaded by path cannot pickle its functions)
    assert prepare.prepare_coco(str(root), verbose=False)["val"] == {"converted": 0, "skipped": 2}
    assert prepare.main(["--root", str(root), "--workers", "1", "--overwrite"]) == 0
    assert prepare.main(["--root", str(tmp_path)]) == 1  # nothing there: an error, not a crash


def test_coco_loads_through_catalog(coco_root):
    root, expected = coco_root
    for split in ("train", "val"):
        plain = DatasetCatalog.get(f"coco_2017_{split}_panoptic")
        with_sem = DatasetCatalog.get(f"coco_2017_{split}_panoptic_with_sem_seg")
        assert len(plain) == len(with_sem) == 2
        assert "sem_seg_file_name" not in plain[0]
        for rec in with_sem:
            assert Path(rec["file_name"]).parent == root / "coco" / f"{split}2017"
            assert os.path.isfile(rec["file_name"]) and os.path.isfile(rec["pan_seg_file_name"])
            assert Path(rec["sem_seg_file_name"]).name in expected[split]
            cats = {s["category_id"] for s in rec["segments_info"]}
            assert cats <= {0, 2, 100, 119}
            assert all(s["isthing"] == (s["category_id"] < 80) for s in rec["segments_info"])
        meta = MetadataCatalog.get(f"coco_2017_{split}_panoptic_with_sem_seg")
        assert len(meta.stuff_classes) == 133  # detectron2 0.6: thing_classes also lists all 133
        assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(80))
        assert meta.json_file == str(root / "coco" / "annotations" / f"instances_{split}2017.json")


def test_cityscapes_loads_through_catalog(cityscapes_root):
    for split in ("train", "val"):
        records = DatasetCatalog.get(f"cityscapes_fine_panoptic_{split}")
        assert len(records) == 2
        for rec in records:
            for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
                assert os.path.isfile(rec[key]), rec[key]
            assert rec["image_id"].startswith(CS_CITIES[split][0])
            assert {s["category_id"] for s in rec["segments_info"]} <= set(CS_TRAIN_ID.values())
        assert MetadataCatalog.get(f"cityscapes_fine_panoptic_{split}").evaluator_type == (
            "cityscapes_panoptic_seg"
        )


def _mapper_cfg(name, num_classes):
    return tiny_cfg(
        "DATASETS.TRAIN", f"('{name}',)",
        "MODEL.DEEPERLAB.NUM_CLASSES", str(num_classes),
        "INPUT.MIN_SIZE_TRAIN", f"({HEIGHT},)",
        "INPUT.CROP.SIZE", f"({HEIGHT}, {WIDTH})",
        "INPUT.RANDOM_FLIP", "none",
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, num_classes, crowd_category",
    [("coco_2017_train_panoptic_with_sem_seg", 133, 0), ("cityscapes_fine_panoptic_train", 19, 13)],
)
def test_mapper_targets(request, name, num_classes, crowd_category):
    request.getfixturevalue("coco_root" if name.startswith("coco") else "cityscapes_root")
    mapper = DeeperLabDatasetMapper(_mapper_cfg(name, num_classes), True)
    for rec in DatasetCatalog.get(name):
        out = mapper(dict(rec))
        assert out["image"].shape == (3, HEIGHT, WIDTH)
        with Image.open(rec["pan_seg_file_name"]) as im:
            rgb = np.asarray(im).astype(np.int64)
        pan = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        sem = out["sem_seg"].numpy()
        things = 0
        for seg in rec["segments_info"]:
            region = sem[pan == seg["id"]]
            if seg["iscrowd"]:
                assert set(np.unique(region).tolist()) <= {crowd_category, 255}
            else:
                assert (region == seg["category_id"]).all()
                things += seg["isthing"] if "isthing" in seg else seg["category_id"] >= 11
        assert (sem[pan == 0] == 255).all()
        assert out["keypoints"].shape[0] == things > 0
        assert out["heatmap"].max() > 0


def _run(train_net, out_dir, *opts, eval_only=False):
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(TINY_CONFIG)]
        + (["--eval-only"] if eval_only else [])
        + [
            "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", "0",
            "INPUT.MIN_SIZE_TRAIN", f"({HEIGHT},)",
            "INPUT.CROP.SIZE", f"({HEIGHT}, {WIDTH})",
            "INPUT.MIN_SIZE_TEST", str(HEIGHT),
            "INPUT.MAX_SIZE_TEST", str(WIDTH),
            "SOLVER.MAX_ITER", "1",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.CHECKPOINT_PERIOD", "100",
            "OUTPUT_DIR", str(out_dir),
            *opts,
        ]
    )  # fmt: skip
    return train_net.main(args)


@pytest.mark.parametrize(
    "train, test, num_classes, evaluators, tasks",
    [
        (
            "coco_2017_train_panoptic",
            "coco_2017_val_panoptic_with_sem_seg",
            133,
            ["COCOEvaluator", "COCOPanopticEvaluator", "ParsingCoveringEvaluator",
             "SemSegEvaluator"],
            {"panoptic_seg", "parsing_covering", "sem_seg", "bbox", "segm"},
        ),
        (
            "cityscapes_fine_panoptic_train",
            "cityscapes_fine_panoptic_val",
            19,
            ["COCOPanopticEvaluator", "ParsingCoveringEvaluator", "SemSegEvaluator"],
            {"panoptic_seg", "parsing_covering", "sem_seg"},
        ),
    ],
)  # fmt: skip
def test_train_step_and_eval_only(request, tmp_path, train, test, num_classes, evaluators, tasks):
    request.getfixturevalue("coco_root" if train.startswith("coco") else "cityscapes_root")
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path))
    assert sorted(type(e).__name__ for e in build_evaluator(cfg, test)._evaluators) == evaluators
    train_net = load_repo_module("train_net.py")
    opts = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)"]
    opts += ["MODEL.DEEPERLAB.NUM_CLASSES", str(num_classes)]
    _run(train_net, tmp_path, *opts)
    assert (tmp_path / "model_final.pth").is_file()
    results = _run(
        train_net, tmp_path, *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
        eval_only=True,
    )  # fmt: skip
    assert set(results) == tasks
    assert {"PQ", "PQ_th", "PQ_st"} <= set(results["panoptic_seg"])
    assert "PC" in results["parsing_covering"] and "mIoU" in results["sem_seg"]
    assert "Evaluation summary:" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize(
    "name, num_classes, thing",
    [("coco_2017_val_panoptic_with_sem_seg", 133, 0), ("cityscapes_fine_panoptic_val", 19, 11)],
)
def test_sem_seg_evaluator_accepts_thing_predictions(request, tmp_path, name, num_classes, thing):
    """detectron2 0.6's metadata of these datasets maps only stuff in
    stuff_dataset_id_to_contiguous_id; a semantic prediction of a thing class must still be
    evaluated (a model predicts things as soon as it has learned anything)."""
    import torch

    request.getfixturevalue("coco_root" if name.startswith("coco") else "cityscapes_root")
    evaluator = build_evaluator(tiny_cfg("OUTPUT_DIR", str(tmp_path)), name)
    sem_seg = next(e for e in evaluator._evaluators if type(e).__name__ == "SemSegEvaluator")
    sem_seg.reset()
    for rec in DatasetCatalog.get(name):
        logits = torch.zeros(num_classes, HEIGHT, WIDTH)
        logits[thing] = 1.0  # everything predicted as the first thing class
        sem_seg.process([{"file_name": rec["file_name"]}], [{"sem_seg": logits}])
    results = sem_seg.evaluate()
    assert 0.0 <= results["sem_seg"]["mIoU"] < 100.0
