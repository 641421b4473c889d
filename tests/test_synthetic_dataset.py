"""Tests of the synthetic COCO-panoptic dataset: generator and Detectron2 registration."""

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import load_prepare_synthetic
from PIL import Image

from deeperlab_d2.data.datasets.synthetic_categories import (
    SYNTHETIC_CATEGORIES,
    synthetic_id_maps,
)

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 192, 256  # the defaults; H != W
NUM_TRAIN, NUM_VAL = 10, 4


prepare = load_prepare_synthetic()


def _generate(root: Path, seed: int = 0, **kwargs) -> Path:
    args = dict(num_train=NUM_TRAIN, num_val=NUM_VAL, height=HEIGHT, width=WIDTH, verbose=False)
    args.update(kwargs)
    return prepare.prepare_synthetic(str(root), seed=seed, **args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    # a raised crowd probability makes sure that a 10-image split contains a crowd region
    return _generate(root, seed=0, crowd_prob=0.5)


def _read_pan(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _iter_split(dataset_dir: Path, split: str):
    """Yield (annotation, panoptic id map) for each image of a split."""
    with open(dataset_dir / "annotations" / f"panoptic_{split}.json") as f:
        pan_json = json.load(f)
    for ann in pan_json["annotations"]:
        yield ann, _read_pan(dataset_dir / f"panoptic_{split}" / ann["file_name"])


def _thing_ids():
    return {c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]}


def _all_files(dataset_dir: Path):
    return sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*") if p.is_file())


def test_categories():
    things = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
    stuff = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
    assert len(things) >= 3 and len(stuff) >= 2
    ids = [c["id"] for c in SYNTHETIC_CATEGORIES]
    assert len(set(ids)) == len(ids)
    assert ids != list(range(len(ids))) and ids != list(range(1, len(ids) + 1))  # not contiguous
    thing_map, stuff_map = synthetic_id_maps()
    assert sorted(stuff_map.values()) == list(range(len(SYNTHETIC_CATEGORIES)))
    assert set(thing_map) == {c["id"] for c in things}
    assert all(stuff_map[k] == v for k, v in thing_map.items())


def test_layout_and_json(dataset):
    for split, num in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        with open(dataset / "annotations" / f"panoptic_{split}.json") as f:
            pan_json = json.load(f)
        with open(dataset / "annotations" / f"instances_{split}.json") as f:
            inst_json = json.load(f)
        assert len(pan_json["images"]) == len(pan_json["annotations"]) == num
        assert pan_json["categories"] == SYNTHETIC_CATEGORIES
        assert {c["id"] for c in inst_json["categories"]} == _thing_ids()
        assert inst_json["images"] == pan_json["images"]
        for img, ann in zip(pan_json["images"], pan_json["annotations"]):
            assert isinstance(img["id"], int) and img["id"] == ann["image_id"]
            assert (img["height"], img["width"]) == (HEIGHT, WIDTH)
            assert img["file_name"].endswith(".jpg")
            assert Path(img["file_name"]).stem == Path(ann["file_name"]).stem
            with Image.open(dataset / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (WIDTH, HEIGHT)
            assert (dataset / f"panoptic_semseg_{split}" / ann["file_name"]).is_file()


def test_determinism(tmp_path):
    small = dict(num_train=3, num_val=2)
    a = _generate(tmp_path / "a", seed=5, **small)
    b = _generate(tmp_path / "b", seed=5, **small)
    c = _generate(tmp_path / "c", seed=6, **small)
    files = _all_files(a)
    assert files == _all_files(b) == _all_files(c)
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".json" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for pattern in ("panoptic_train/*.png", "annotations/*.json", "train/*.jpg"):
        differ = [(a / f).read_bytes() != (c / f).read_bytes() for f in files if f.match(pattern)]
        assert differ and all(differ), pattern
    # val derives its own seed: its images are not copies of the train images
    assert (a / "train/000000.jpg").read_bytes() != (a / "val/000000.jpg").read_bytes()
    # rerunning overwrites in place
    _generate(tmp_path / "a", seed=5, **small)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_panoptic_png_matches_segments_info(dataset):
    cat_ids = {c["id"] for c in SYNTHETIC_CATEGORIES}
    for split in ("train", "val"):
        for ann, pan in _iter_split(dataset, split):
            seg_ids = [s["id"] for s in ann["segments_info"]]
            assert len(set(seg_ids)) == len(seg_ids) and 0 not in seg_ids
            png_ids = set(np.unique(pan).tolist()) - {0}
            assert png_ids == set(seg_ids)
            for seg in ann["segments_info"]:
                assert seg["category_id"] in cat_ids
                assert seg["iscrowd"] in (0, 1)
                if seg["iscrowd"]:
                    assert seg["category_id"] in _thing_ids()
                mask = pan == seg["id"]
                ys, xs = np.nonzero(mask)
                assert seg["area"] == int(mask.sum()) >= prepare.MIN_AREA
                x0, y0 = int(xs.min()), int(ys.min())
                assert seg["bbox"] == [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def test_semseg_matches_panoptic(dataset):
    _, stuff_map = synthetic_id_maps()
    for split in ("train", "val"):
        for ann, pan in _iter_split(dataset, split):
            sem = np.asarray(Image.open(dataset / f"panoptic_semseg_{split}" / ann["file_name"]))
            assert sem.dtype == np.uint8 and sem.shape == pan.shape
            expected = np.full(pan.shape, 255, dtype=np.uint8)
            for seg in ann["segments_info"]:
                if not seg["iscrowd"]:
                    expected[pan == seg["id"]] = stuff_map[seg["category_id"]]
            np.testing.assert_array_equal(sem, expected)


def test_instances_json_matches_panoptic(dataset):
    from pycocotools import mask as mask_util

    for split in ("train", "val"):
        with open(dataset / "annotations" / f"instances_{split}.json") as f:
            inst_json = json.load(f)
        by_image = {}
        for a in inst_json["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        ann_ids = [a["id"] for a in inst_json["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
        for ann, pan in _iter_split(dataset, split):
            things = [s for s in ann["segments_info"] if s["category_id"] in _thing_ids()]
            insts = by_image.get(ann["image_id"], [])
            assert len(insts) == len(things)
            for seg, inst in zip(things, insts):
                assert inst["category_id"] == seg["category_id"]
                assert inst["iscrowd"] == seg["iscrowd"]
                assert inst["area"] == seg["area"] and inst["bbox"] == seg["bbox"]
                decoded = mask_util.decode(inst["segmentation"]).astype(bool)
                np.testing.assert_array_equal(decoded, pan == seg["id"])


def test_hard_cases_present(dataset):
    thing_ids = _thing_ids()
    ring_id = next(c["id"] for c in SYNTHETIC_CATEGORIES if c["name"] == "ring")
    small = crowd = border = ring_com_outside = touching = void = 0
    for ann, pan in _iter_split(dataset, "train"):
        h, w = pan.shape
        void += int((pan == 0).sum())
        inst_ids = set()
        for seg in ann["segments_info"]:
            if seg["category_id"] not in thing_ids:
                continue
            if seg["iscrowd"]:
                crowd += 1
                continue
            inst_ids.add(seg["id"])
            x, y, bw, bh = seg["bbox"]
            small += int(seg["area"] < 64 * 64)
            border += int(x == 0 or y == 0 or x + bw == w or y + bh == h)
            if seg["category_id"] == ring_id:
                ys, xs = np.nonzero(pan == seg["id"])
                cy, cx = int(round(ys.mean())), int(round(xs.mean()))
                ring_com_outside += int(pan[cy, cx] != seg["id"])
        if len(inst_ids) >= 2:
            ids = np.array(sorted(inst_ids))
            for a, b in ((pan[:, :-1], pan[:, 1:]), (pan[:-1, :], pan[1:, :])):
                pair = np.isin(a, ids) & np.isin(b, ids) & (a != b)
                touching += int(pair.sum())
    assert small >= 5, small
    assert crowd >= 1
    assert border >= 1
    assert ring_com_outside >= 1
    assert touching >= 1
    assert void >= 1


def test_cli_main(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--seed", "3", "--num-train", "2", "--num-val", "1"]
    prepare.main(argv + ["--height", "64", "--width", "80"])
    out = capsys.readouterr().out
    assert "train: 2 images" in out and "val: 1 images" in out
    base = tmp_path / "deeperlab_synthetic"
    with Image.open(base / "val" / "000000.jpg") as im:
        assert im.size == (80, 64)
    assert len(list((base / "panoptic_train").glob("*.png"))) == 2


def test_registration(dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    prefix = f"test_synthetic_{uuid.uuid4().hex[:8]}"
    names = None
    try:
        import deeperlab_d2.data.datasets as builtin
        from deeperlab_d2.data.datasets import register_deeperlab_synthetic

        assert "deeperlab_synthetic_train" in DatasetCatalog.list()
        builtin.register_all("unused")  # a second call must not fail nor double-register

        names = register_deeperlab_synthetic(str(dataset.parent), prefix=prefix)
        assert names == [f"{prefix}_train", f"{prefix}_val"]
        thing_map, stuff_map = synthetic_id_maps()
        for name, num in zip(names, (NUM_TRAIN, NUM_VAL)):
            meta = MetadataCatalog.get(name)
            assert meta.evaluator_type == "coco_panoptic_seg"
            assert meta.ignore_label == 255 and meta.label_divisor == 1000
            assert meta.stuff_dataset_id_to_contiguous_id == stuff_map
            assert meta.thing_dataset_id_to_contiguous_id == thing_map
            assert len(meta.stuff_classes) == len(stuff_map) == len(meta.stuff_colors)
            assert len(meta.thing_classes) == len(thing_map) == len(meta.thing_colors)
            for key in ("panoptic_root", "image_root", "panoptic_json", "json_file"):
                assert Path(getattr(meta, key)).exists(), key
            assert Path(meta.sem_seg_root).is_dir()

            records = DatasetCatalog.get(name)
            assert len(records) == num
            for r in records:
                for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
                    assert Path(r[key]).is_file(), r[key]
                assert isinstance(r["image_id"], int)
                assert r["segments_info"]
                for seg in r["segments_info"]:
                    assert 0 <= seg["category_id"] < len(stuff_map)
                    assert seg["isthing"] == (seg["category_id"] < len(thing_map))
        # re-registering (e.g. with another root) replaces the entries
        register_deeperlab_synthetic(str(dataset.parent), prefix=prefix)
    finally:
        for name in names or []:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_unprepared_root_raises(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from deeperlab_d2.data.datasets import register_deeperlab_synthetic

    prefix = f"test_unprepared_{uuid.uuid4().hex[:8]}"
    names = register_deeperlab_synthetic(str(tmp_path / "nowhere"), prefix=prefix)
    try:
        with pytest.raises(FileNotFoundError, match="prepare_synthetic.py") as err:
            DatasetCatalog.get(names[0])
        assert "panoptic_train.json" in str(err.value)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
