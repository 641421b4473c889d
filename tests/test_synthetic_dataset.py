"""Tests of the synthetic COCO-panoptic dataset: generator (both variants) and registration."""

import colorsys
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import load_prepare_synthetic
from PIL import Image

from deeperlab_d2.data.datasets.synthetic_categories import (
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_DATASET_NAME,
    SYNTHETIC_SHAPE_DATASET_NAME,
    synthetic_id_maps,
)

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 192, 256  # the defaults; H != W
NUM_TRAIN, NUM_VAL = 10, 4


prepare = load_prepare_synthetic()
VARIANTS = ("appearance", "shape")
DIRNAMES = {"appearance": SYNTHETIC_DATASET_NAME, "shape": SYNTHETIC_SHAPE_DATASET_NAME}


def _generate(root: Path, seed: int = 0, **kwargs) -> Path:
    args = dict(num_train=NUM_TRAIN, num_val=NUM_VAL, height=HEIGHT, width=WIDTH, verbose=False)
    args.update(kwargs)
    return prepare.prepare_synthetic(str(root), seed=seed, **args)


@pytest.fixture(scope="module", params=VARIANTS)
def dataset(request, tmp_path_factory):
    """A 10-train / 4-val dataset of each variant (every test that uses it runs on both)."""
    root = tmp_path_factory.mktemp(f"synthetic_{request.param}")
    # a raised crowd probability makes sure that a 10-image split contains a crowd region
    return _generate(root, seed=0, crowd_prob=0.5, variant=request.param)


def _variant(dataset_dir: Path) -> str:
    return {v: k for k, v in DIRNAMES.items()}[dataset_dir.name]


@pytest.fixture(scope="module")
def variant_pair(tmp_path_factory):
    """Both variants generated with the same arguments under one root (as on disk), with a
    crowd in every non-empty image: {variant: dataset folder}."""
    root = tmp_path_factory.mktemp("synthetic_pair")
    args = dict(seed=0, num_train=12, num_val=8, crowd_prob=1.0)
    return {v: _generate(root, variant=v, **args) for v in VARIANTS}


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
        assert pan_json["info"]["variant"] == inst_json["info"]["variant"] == _variant(dataset)
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_determinism(tmp_path, variant):
    small = dict(num_train=3, num_val=2, variant=variant)
    a = _generate(tmp_path / "a", seed=5, **small)
    b = _generate(tmp_path / "b", seed=5, **small)
    c = _generate(tmp_path / "c", seed=6, **small)
    assert a == tmp_path / "a" / DIRNAMES[variant]
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
    assert _all_files(a) == files
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


def _touching_pixels(pan: np.ndarray, ids, same_class: dict = None) -> int:
    """Number of 4-neighbour pixel pairs on the boundary of two different segments of ``ids``
    (of the same class when ``same_class``, segment id -> category id, is given)."""
    ids = np.array(sorted(ids))
    cat = np.zeros(pan.shape, dtype=np.int64)
    for sid, cid in (same_class or {}).items():
        cat[pan == sid] = cid
    n = 0
    for sl_a, sl_b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ):
        a, b = pan[sl_a], pan[sl_b]
        pair = np.isin(a, ids) & np.isin(b, ids) & (a != b)
        if same_class is not None:
            pair &= cat[sl_a] == cat[sl_b]
        n += int(pair.sum())
    return n


def test_hard_cases_present(dataset):
    thing_ids = _thing_ids()
    ring_id = next(c["id"] for c in SYNTHETIC_CATEGORIES if c["name"] == "ring")
    small = crowd = border = ring_com_outside = touching = same_class_touching = void = 0
    for ann, pan in _iter_split(dataset, "train"):
        h, w = pan.shape
        void += int((pan == 0).sum())
        inst = {}
        for seg in ann["segments_info"]:
            if seg["category_id"] not in thing_ids:
                continue
            if seg["iscrowd"]:
                crowd += 1
                continue
            inst[seg["id"]] = seg["category_id"]
            x, y, bw, bh = seg["bbox"]
            small += int(seg["area"] < 64 * 64)
            border += int(x == 0 or y == 0 or x + bw == w or y + bh == h)
            if seg["category_id"] == ring_id:
                ys, xs = np.nonzero(pan == seg["id"])
                cy, cx = int(round(ys.mean())), int(round(xs.mean()))
                ring_com_outside += int(pan[cy, cx] != seg["id"])
        if len(inst) >= 2:
            touching += _touching_pixels(pan, inst)
            same_class_touching += _touching_pixels(pan, inst, same_class=inst)
    assert small >= 5, small
    assert crowd >= 1
    assert border >= 1
    assert ring_com_outside >= 1
    assert touching >= 1
    assert same_class_touching >= 1  # two instances of one class, side by side
    assert void >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_images_and_void_bands(variant):
    # images without things and void bands along stuff boundaries, in both variants
    thing_ids = _thing_ids()
    band_pixels = 0
    for i in range(4):
        rng = np.random.default_rng([7, i])
        image, pan, segments = prepare.generate_image(
            rng, 64, 80, empty_prob=1.0, void_band_prob=1.0, variant=variant
        )
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        assert not [s for s in segments if s["category_id"] in thing_ids]
        band_pixels += int((pan == 0).sum())  # no thing: every void pixel is on a band
    assert band_pixels >= 1


def test_cli_main(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--seed", "3", "--num-train", "2", "--num-val", "1"]
    prepare.main(argv + ["--height", "64", "--width", "80"])
    out = capsys.readouterr().out
    assert "train: 2 images" in out and "val: 1 images" in out
    base = tmp_path / "deeperlab_synthetic"
    with Image.open(base / "val" / "000000.jpg") as im:
        assert im.size == (80, 64)
    assert len(list((base / "panoptic_train").glob("*.png"))) == 2
    # the shape variant goes to its own folder and leaves the default one alone
    prepare.main(argv + ["--height", "64", "--width", "80", "--variant", "shape"])
    out = capsys.readouterr().out
    assert "shape train: 2 images" in out
    shape_base = tmp_path / "deeperlab_synthetic_shape"
    with open(shape_base / "annotations" / "panoptic_val.json") as f:
        assert json.load(f)["info"]["variant"] == "shape"
    with open(base / "annotations" / "panoptic_val.json") as f:
        assert json.load(f)["info"]["variant"] == "appearance"
    with pytest.raises(SystemExit):
        prepare.main(argv + ["--variant", "colour"])
    with pytest.raises(ValueError, match="variant"):
        prepare.prepare_synthetic(str(tmp_path), num_train=1, num_val=1, variant="colour")


def test_registration(dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    prefix = f"test_synthetic_{uuid.uuid4().hex[:8]}"
    names = None
    try:
        import deeperlab_d2.data.datasets as builtin
        from deeperlab_d2.data.datasets import (
            register_deeperlab_synthetic,
            register_deeperlab_synthetic_shape,
        )

        for builtin_name in ("deeperlab_synthetic", "deeperlab_synthetic_shape"):
            for split in ("train", "val"):
                assert f"{builtin_name}_{split}" in DatasetCatalog.list()
        builtin.register_all("unused")  # a second call must not fail nor double-register
        register = {
            "appearance": register_deeperlab_synthetic,
            "shape": register_deeperlab_synthetic_shape,
        }[_variant(dataset)]

        names = register(str(dataset.parent), prefix=prefix)
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
                assert Path(getattr(meta, key)).is_relative_to(dataset), key
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
        register(str(dataset.parent), prefix=prefix)
    finally:
        for name in names or []:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unprepared_root_raises(tmp_path, variant):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from deeperlab_d2.data.datasets import (
        register_deeperlab_synthetic,
        register_deeperlab_synthetic_shape,
    )

    register = {
        "appearance": register_deeperlab_synthetic,
        "shape": register_deeperlab_synthetic_shape,
    }[variant]
    prefix = f"test_unprepared_{uuid.uuid4().hex[:8]}"
    names = register(str(tmp_path / "nowhere"), prefix=prefix)
    try:
        with pytest.raises(FileNotFoundError, match="prepare_synthetic.py") as err:
            DatasetCatalog.get(names[0])
        assert "panoptic_train.json" in str(err.value)
        assert DIRNAMES[variant] + "/" in str(err.value)
        assert ("--variant shape" in str(err.value)) == (variant == "shape")
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------------------
# the two variants: same annotations, different appearance of the things
# ------------------------------------------------------------------------------------------
def test_variants_have_identical_annotations(variant_pair):
    app, shape = variant_pair["appearance"], variant_pair["shape"]
    assert app.name == SYNTHETIC_DATASET_NAME and shape.name == SYNTHETIC_SHAPE_DATASET_NAME
    assert app.parent == shape.parent
    files = _all_files(app)
    assert files == _all_files(shape)
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 2 * (12 + 8)  # panoptic and semantic PNGs of both splits
    for f in pngs:
        assert (app / f).read_bytes() == (shape / f).read_bytes(), f
    for f in files:
        if f.suffix == ".json":
            with open(app / f) as fa, open(shape / f) as fs:
                a, b = json.load(fa), json.load(fs)
            assert a.pop("info")["variant"] == "appearance"
            assert b.pop("info")["variant"] == "shape"
            assert a == b, f
    # ... while the images differ (on the things)
    jpgs = [f for f in files if f.suffix == ".jpg"]
    differ = [(app / f).read_bytes() != (shape / f).read_bytes() for f in jpgs]
    assert sum(differ) >= len(jpgs) - 2  # all but images without things


def test_variants_differ_only_on_things():
    thing_ids = _thing_ids()
    for i in range(3):
        out = {
            v: prepare.generate_image(np.random.default_rng([11, i]), 96, 128, variant=v)
            for v in VARIANTS
        }
        (img_a, pan_a, seg_a), (img_s, pan_s, seg_s) = out["appearance"], out["shape"]
        np.testing.assert_array_equal(pan_a, pan_s)
        assert seg_a == seg_s
        things = np.isin(pan_a, [s["id"] for s in seg_a if s["category_id"] in thing_ids])
        stuff = np.isin(pan_a, [s["id"] for s in seg_a if s["category_id"] not in thing_ids])
        assert things.sum() >= 100
        np.testing.assert_array_equal(img_a[stuff], img_s[stuff])  # stuff is not repainted
        assert np.abs(img_a[things].astype(int) - img_s[things]).mean() > 20


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def _appearance_features(dataset_dir: Path, split: str, min_area: int = 60):
    """Simple per-segment appearance features of the thing segments of a split, measured on
    the JPEG images inside the (eroded) ground-truth masks.

    Returns:
        dict: ``colour`` (N, 4): the saturation-weighted hue vector, saturation and value of
        the segment's mean colour; ``texture`` (N, 3): log mean absolute horizontal / vertical
        grey-level difference and their log ratio; ``rgb`` (N, 3): mean colour; ``label``
        (N,): contiguous class; ``crowd`` (N,): bool.
    """
    thing_map, _ = synthetic_id_maps()
    rows = {"colour": [], "texture": [], "rgb": [], "label": [], "crowd": []}
    for ann, pan in _iter_split(dataset_dir, split):
        image = np.asarray(Image.open(dataset_dir / split / f"{Path(ann['file_name']).stem}.jpg"))
        image = image.astype(np.float32)
        grey = image.mean(-1)
        for seg in ann["segments_info"]:
            if seg["category_id"] not in thing_map or seg["area"] < min_area:
                continue
            mask = _erode(pan == seg["id"])
            if mask.sum() < 20:
                continue
            rgb = image[mask].mean(0)
            hue, sat, val = colorsys.rgb_to_hsv(*(rgb / 255.0))
            gx = np.abs(np.diff(grey, axis=1))[mask[:, 1:] & mask[:, :-1]].mean()
            gy = np.abs(np.diff(grey, axis=0))[mask[1:] & mask[:-1]].mean()
            angle = 2 * np.pi * hue
            rows["colour"].append([sat * np.cos(angle), sat * np.sin(angle), sat, val])
            rows["texture"].append([np.log1p(gx), np.log1p(gy), np.log1p(gy) - np.log1p(gx)])
            rows["rgb"].append(rgb)
            rows["label"].append(thing_map[seg["category_id"]])
            rows["crowd"].append(bool(seg["iscrowd"]))
    return {k: np.asarray(v) for k, v in rows.items()}


def _nearest_class_mean_accuracy(train: dict, test: dict, keys) -> float:
    """Fit standardized class means on the train instances (not crowds), classify ``test``."""
    x_train = np.concatenate([train[k] for k in keys], axis=1)[~train["crowd"]]
    y_train = train["label"][~train["crowd"]]
    x_test = np.concatenate([test[k] for k in keys], axis=1)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    classes = np.unique(y_train)
    means = np.stack([x_train[y_train == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    return float((pred == test["label"]).mean())


@pytest.fixture(scope="module")
def variant_features(variant_pair):
    out = {}
    for variant, d in variant_pair.items():
        train, val = _appearance_features(d, "train"), _appearance_features(d, "val")
        out[variant] = train, {k: v[~val["crowd"]] for k, v in val.items()}, val
    return out


def test_appearance_separates_thing_classes(variant_features):
    # class means fitted on the train instances, accuracy on the val instances (4 classes)
    acc = {}
    for variant, (train, val, _) in variant_features.items():
        assert len(val["label"]) >= 30 and set(val["label"].tolist()) == {0, 1, 2, 3}
        for name, keys in (
            ("colour", ["colour"]),
            ("texture", ["texture"]),
            ("both", ["colour", "texture"]),
        ):
            acc[variant, name] = _nearest_class_mean_accuracy(train, val, keys)
    # appearance variant: colour and texture are each a strong cue, together nearly perfect
    assert acc["appearance", "both"] >= 0.9, acc
    assert acc["appearance", "colour"] >= 0.8, acc
    assert acc["appearance", "texture"] >= 0.7, acc
    # shape variant: colours are random, the classifier is near chance (0.25)
    assert acc["shape", "colour"] <= 0.45, acc
    assert acc["shape", "both"] <= 0.55, acc
    assert acc["appearance", "colour"] >= acc["shape", "colour"] + 0.4, acc


def test_crowds_use_their_class_family(variant_features):
    # a crowd (one segment made of many small shapes of one class) is painted in its class's
    # family: the class means of the single instances classify the crowds
    train, _, val = variant_features["appearance"]
    crowds = {k: np.concatenate([train[k][train["crowd"]], val[k][val["crowd"]]]) for k in train}
    assert len(crowds["label"]) >= 10
    assert _nearest_class_mean_accuracy(train, crowds, ["colour"]) >= 0.8


def test_appearance_varies_within_class(variant_features):
    # not one fixed colour per class: the mean colours of a class's instances spread
    for variant, (train, _, _) in variant_features.items():
        for c in range(4):
            rgb = train["rgb"][(train["label"] == c) & ~train["crowd"]]
            assert len(rgb) >= 5
            assert rgb.std(0).max() >= 12.0, (variant, c, rgb.std(0))
            # ... and so do their hues (by more than JPEG noise), in a restricted range
            colour = train["colour"][(train["label"] == c) & ~train["crowd"]]
            hue_vector = colour[:, :2] / np.maximum(colour[:, 2:3], 1e-6)
            spread = 1.0 - np.linalg.norm(hue_vector.mean(0))  # circular variance of the hue
            if variant == "appearance":
                assert 0.005 <= spread <= 0.25, (c, spread)
            else:
                assert spread >= 0.3, (c, spread)
