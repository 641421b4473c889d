"""Tests of the Mapillary Vistas v1.2 panoptic support on a fake miniature of the official layout.

The miniature (3 train + 2 val images of 32x48) has 4 categories whose list order differs from
their id order (the contiguous id is the index in the list), STRING image ids (one of them with
a leading zero), crowd segments, void pixels (id 0) and pixels whose segment id is missing from
``segments_info`` (also void).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import load_repo_module
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from deeperlab_d2.data.datasets.mapillary_vistas import (
    get_mapillary_vistas_metadata,
    register_mapillary_vistas_panoptic,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "prepare_mapillary_vistas.py"
HEIGHT, WIDTH = 32, 48

# list order != id order: contiguous ids are person 0, road 1, car 2, sky 3
CATEGORIES = [
    {
        "id": 3,
        "name": "human--person",
        "supercategory": "human--person",
        "isthing": 1,
        "color": [220, 20, 60],
    },
    {
        "id": 1,
        "name": "construction--flat--road",
        "supercategory": "construction--flat",
        "isthing": 0,
        "color": [128, 64, 128],
    },
    {
        "id": 4,
        "name": "object--vehicle--car",
        "supercategory": "object--vehicle",
        "isthing": 1,
        "color": [0, 0, 142],
    },
    {
        "id": 2,
        "name": "nature--sky",
        "supercategory": "nature--sky",
        "isthing": 0,
        "color": [70, 130, 180],
    },
]
CONTIGUOUS = {3: 0, 1: 1, 4: 2, 2: 3}
SPLIT_KEYS = {
    "training": ["0123", "Ab_cD-ef9XyZ01234567qq", "_zzTop-99"],
    "validation": ["0456", "Vv_val-key"],
}
REGISTERED_SPLIT = {"train": "training", "val": "validation"}


prepare = load_repo_module("datasets/prepare_mapillary_vistas.py")


def _fake_image(rng: np.random.Generator, with_crowd: bool):
    """Paint one fake panoptic annotation.

    Returns:
        tuple: (panoptic ids (H, W) int64, expected semantic labels (H, W) uint8, segments as
        ``(segment id, dataset category id, iscrowd)``).
    """
    pan = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    expected = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
    ids = iter((rng.choice(256**3 - 1, size=16, replace=False) + 1).tolist())
    segments = []

    def paint(mask, category_id, iscrowd=0):
        seg_id = next(ids)
        pan[mask] = seg_id
        expected[mask] = 255 if iscrowd else CONTIGUOUS[category_id]
        segments.append((seg_id, category_id, iscrowd))

    rows = np.arange(HEIGHT)[:, None] + np.zeros((1, WIDTH), dtype=int)
    cols = np.arange(WIDTH)[None, :] + np.zeros((HEIGHT, 1), dtype=int)
    horizon = int(rng.integers(10, 20))
    paint(rows < horizon, 2)  # sky
    paint(rows >= horizon, 1)  # road
    # void band along the horizon
    pan[horizon, :] = 0
    expected[horizon, :] = 255
    for category_id in (3, 3, 4):
        y, x = int(rng.integers(0, HEIGHT - 8)), int(rng.integers(0, WIDTH - 8))
        h, w = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        paint((rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w), category_id)
    if with_crowd:
        paint((rows >= HEIGHT - 6) & (cols >= WIDTH - 10), 4, iscrowd=1)
    # pixels of a segment that is not listed in segments_info: void as well
    unlisted = next(ids)
    pan[0:2, 0:3] = unlisted
    expected[0:2, 0:3] = 255
    return pan, expected, segments


def _segment_info(pan: np.ndarray, seg_id: int, category_id: int, iscrowd: int) -> dict:
    ys, xs = np.nonzero(pan == seg_id)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": seg_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "area": int(len(xs)),
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
    }


def make_fake_vistas(root: Path) -> dict:
    """Write a fake Mapillary Vistas v1.2 miniature under ``root/mapillary_vistas``.

    Returns:
        dict: split -> {key: expected semantic labels}.
    """
    expected_by_split = {}
    for split_index, (split, keys) in enumerate(SPLIT_KEYS.items()):
        split_dir = root / "mapillary_vistas" / split
        (split_dir / "images").mkdir(parents=True)
        (split_dir / "panoptic").mkdir(parents=True)
        images, annotations, expected_by_split[split] = [], [], {}
        for index, key in enumerate(keys):
            rng = np.random.default_rng([split_index, index])
            pan, expected, segments = _fake_image(rng, with_crowd=index == 0)
            rgb = np.stack([pan % 256, pan // 256 % 256, pan // 256**2], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(split_dir / "panoptic" / f"{key}.png")
            photo = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(photo).save(split_dir / "images" / f"{key}.jpg")
            segments_info = [
                _segment_info(pan, s, c, crowd) for s, c, crowd in segments if (pan == s).any()
            ]
            images.append({"file_name": f"{key}.jpg", "id": key, "height": HEIGHT, "width": WIDTH})
            annotations.append(
                {"image_id": key, "file_name": f"{key}.png", "segments_info": segments_info}
            )
            expected_by_split[split][key] = expected
        pan_json = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        with open(split_dir / "panoptic" / "panoptic_2018.json", "w") as f:
            json.dump(pan_json, f)
    return expected_by_split


def _read_json(split_dir: Path) -> dict:
    with open(split_dir / "panoptic" / "panoptic_2018.json") as f:
        return json.load(f)


@pytest.fixture
def prefix():
    name = f"test_mapillary_{uuid.uuid4().hex[:8]}"
    yield name
    for split in REGISTERED_SPLIT:
        if f"{name}_{split}" in DatasetCatalog.list():
            DatasetCatalog.remove(f"{name}_{split}")
        if f"{name}_{split}" in MetadataCatalog.list():
            MetadataCatalog.remove(f"{name}_{split}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("vistas")
    expected = make_fake_vistas(root)
    stats = prepare.prepare_mapillary_vistas(str(root), workers=1, verbose=False)
    assert stats == {
        "training": {"converted": 3, "skipped": 0},
        "validation": {"converted": 2, "skipped": 0},
    }
    return root, expected


def _check_semseg(root: Path, expected: dict) -> None:
    for split, per_key in expected.items():
        for key, labels in per_key.items():
            with Image.open(
                root / "mapillary_vistas" / split / "panoptic_semseg" / f"{key}.png"
            ) as im:
                assert im.mode == "L"
                got = np.asarray(im)
            np.testing.assert_array_equal(got, labels, err_msg=f"{split}/{key}")


def test_prepare_writes_semseg_and_categories(prepared):
    root, expected = prepared
    _check_semseg(root, expected)
    # the fake data does contain every kind of label
    all_labels = np.concatenate(
        [e.ravel() for per_key in expected.values() for e in per_key.values()]
    )
    assert set(np.unique(all_labels).tolist()) == {0, 1, 2, 3, 255}
    with open(root / "mapillary_vistas" / "categories.json") as f:
        assert json.load(f) == CATEGORIES


def test_prepare_skips_existing_unless_overwrite(tmp_path, capsys):
    expected = make_fake_vistas(tmp_path)
    prepare.prepare_mapillary_vistas(str(tmp_path), workers=1, verbose=False)
    target = tmp_path / "mapillary_vistas" / "training" / "panoptic_semseg" / "0123.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.uint8)).save(target)

    assert prepare.main(["--root", str(tmp_path), "--workers", "1", "--log-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "[training] 0 images to convert, 3 skipped" in out
    assert np.asarray(Image.open(target)).max() == 0  # kept

    assert prepare.main(["--root", str(tmp_path), "--workers", "1", "--overwrite"]) == 0
    assert "[training] 3/3 images converted" in capsys.readouterr().out
    _check_semseg(tmp_path, expected)


def test_prepare_cli_with_workers(tmp_path):
    expected = make_fake_vistas(tmp_path)
    shutil.rmtree(tmp_path / "mapillary_vistas" / "validation")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))  # default --root
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workers", "2", "--log-every", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for done in (1, 2, 3):
        assert f"[training] {done}/3 images converted" in proc.stdout
    assert "validation" not in proc.stdout  # absent split: skipped
    _check_semseg(tmp_path, {"training": expected["training"]})


def test_prepare_errors_name_missing_paths(tmp_path, capsys):
    base = tmp_path / "mapillary_vistas"
    with pytest.raises(FileNotFoundError, match=re.escape(str(base))):
        prepare.prepare_mapillary_vistas(str(tmp_path), verbose=False)
    assert prepare.main(["--root", str(tmp_path)]) == 1
    assert str(base) in capsys.readouterr().err

    base.mkdir()
    with pytest.raises(FileNotFoundError, match="training"):
        prepare.prepare_mapillary_vistas(str(tmp_path), verbose=False)

    (base / "training" / "panoptic").mkdir(parents=True)
    json_path = base / "training" / "panoptic" / "panoptic_2018.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(json_path))):
        prepare.prepare_mapillary_vistas(str(tmp_path), verbose=False)

    shutil.rmtree(base)
    make_fake_vistas(tmp_path)
    png = base / "validation" / "panoptic" / "Vv_val-key.png"
    png.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(png))):
        prepare.prepare_mapillary_vistas(str(tmp_path), workers=1, verbose=False)


def test_register_and_load(prepared, prefix):
    root, _ = prepared
    names = register_mapillary_vistas_panoptic(str(root), prefix=prefix)
    assert names == [f"{prefix}_train", f"{prefix}_val"]
    for split, folder in REGISTERED_SPLIT.items():
        name = f"{prefix}_{split}"
        split_dir = root / "mapillary_vistas" / folder
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["human--person", "object--vehicle--car"]
        assert meta.thing_colors == [[220, 20, 60], [0, 0, 142]]
        assert meta.stuff_classes == [c["name"] for c in CATEGORIES]
        assert meta.stuff_colors == [c["color"] for c in CATEGORIES]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 4: 2}
        assert meta.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
        assert meta.image_root == str(split_dir / "images")
        assert meta.panoptic_root == str(split_dir / "panoptic")
        assert meta.panoptic_json == str(split_dir / "panoptic" / "panoptic_2018.json")
        assert meta.sem_seg_root == str(split_dir / "panoptic_semseg")
        assert meta.evaluator_type == "coco_panoptic_seg"
        assert meta.ignore_label == 255
        assert meta.label_divisor == 1000

        records = DatasetCatalog.get(name)
        pan_json = _read_json(split_dir)
        assert [r["image_id"] for r in records] == SPLIT_KEYS[folder]
        for record, ann in zip(records, pan_json["annotations"]):
            key = record["image_id"]
            assert isinstance(key, str)
            assert record["file_name"] == str(split_dir / "images" / f"{key}.jpg")
            assert record["pan_seg_file_name"] == str(split_dir / "panoptic" / f"{key}.png")
            assert record["sem_seg_file_name"] == str(split_dir / "panoptic_semseg" / f"{key}.png")
            assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
            assert len(record["segments_info"]) == len(ann["segments_info"])
            for seg, raw in zip(record["segments_info"], ann["segments_info"]):
                assert seg["category_id"] == CONTIGUOUS[raw["category_id"]]
                assert seg["isthing"] == (raw["category_id"] in (3, 4))
                for field in ("id", "iscrowd", "area", "bbox"):
                    assert seg[field] == raw[field]
            assert any(s["iscrowd"] for s in record["segments_info"]) == (
                key == SPLIT_KEYS[folder][0]
            )
        # the loader does not modify the metadata derived at registration
        assert MetadataCatalog.get(name).stuff_dataset_id_to_contiguous_id == CONTIGUOUS


def test_metadata_helper_matches_convention():
    meta = get_mapillary_vistas_metadata(CATEGORIES)
    assert meta["stuff_dataset_id_to_contiguous_id"] == CONTIGUOUS
    assert meta["thing_classes"] == ["human--person", "object--vehicle--car"]


def test_unprepared_root_registers_lazily_and_explains(tmp_path, prefix):
    # nothing at all under the root: registration still works, loading explains what to do
    register_mapillary_vistas_panoptic(str(tmp_path), prefix=prefix)
    with pytest.raises(FileNotFoundError, match="prepare_mapillary_vistas.py"):
        DatasetCatalog.get(f"{prefix}_train")

    # raw data but not prepared
    expected = make_fake_vistas(tmp_path)
    register_mapillary_vistas_panoptic(str(tmp_path), prefix=prefix)
    meta = MetadataCatalog.get(f"{prefix}_train")
    assert meta.panoptic_root == str(tmp_path / "mapillary_vistas" / "training" / "panoptic")
    assert not hasattr(meta, "thing_classes")
    with pytest.raises(FileNotFoundError, match="prepare_mapillary_vistas.py") as info:
        DatasetCatalog.get(f"{prefix}_val")
    assert str(tmp_path / "mapillary_vistas" / "categories.json") in str(info.value)

    # categories.json present but no semantic labels
    with open(tmp_path / "mapillary_vistas" / "categories.json", "w") as f:
        json.dump(CATEGORIES, f)
    semseg_dir = tmp_path / "mapillary_vistas" / "training" / "panoptic_semseg"
    with pytest.raises(FileNotFoundError, match="prepare_mapillary_vistas.py") as info:
        DatasetCatalog.get(f"{prefix}_train")
    assert str(semseg_dir) in str(info.value)

    # prepared after registration: loading works and fills in the category metadata
    prepare.prepare_mapillary_vistas(str(tmp_path), workers=1, verbose=False)
    assert len(DatasetCatalog.get(f"{prefix}_train")) == 3
    assert MetadataCatalog.get(f"{prefix}_train").stuff_classes == [c["name"] for c in CATEGORIES]
    _check_semseg(tmp_path, expected)

    # panoptic json missing
    json_path = tmp_path / "mapillary_vistas" / "validation" / "panoptic" / "panoptic_2018.json"
    json_path.unlink()
    with pytest.raises(FileNotFoundError, match="prepare_mapillary_vistas.py") as info:
        DatasetCatalog.get(f"{prefix}_val")
    assert str(json_path) in str(info.value)


def test_missing_images_are_named(tmp_path, prefix):
    make_fake_vistas(tmp_path)
    prepare.prepare_mapillary_vistas(str(tmp_path), workers=1, verbose=False)
    register_mapillary_vistas_panoptic(str(tmp_path), prefix=prefix)

    image_dir = tmp_path / "mapillary_vistas" / "training" / "images"
    image_dir.rename(image_dir.with_name("images_moved"))
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get(f"{prefix}_train")
    assert str(image_dir) in str(info.value)

    image_dir.with_name("images_moved").rename(image_dir)
    missing = image_dir / "_zzTop-99.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get(f"{prefix}_train")
    assert str(missing) in str(info.value)


def test_registered_on_import():
    import deeperlab_d2  # noqa: F401

    for split in REGISTERED_SPLIT:
        name = f"mapillary_vistas_panoptic_{split}"
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).evaluator_type == "coco_panoptic_seg"
