"""Data that does not match its annotation, broken jsons, configs that do not fit the data, the
pre-flight data check and the demo on a folder with a broken image: clear errors that name the
file (and image / segment / key), never a silent all-void image."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, load_prepare_synthetic, load_repo_module, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from deeperlab_d2.config import check_deeperlab_config
from deeperlab_d2.data import (
    AnnotationMismatchError,
    DatasetFileError,
    DeeperLabDatasetMapper,
    load_dataset,
)
from deeperlab_d2.data.build import MapSkippingMismatches
from deeperlab_d2.data.check import check_dataset
from deeperlab_d2.data.datasets.coco_panoptic import load_panoptic_json
from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic


@pytest.fixture()
def synth_copy(tmp_path):
    """A fresh 4-train / 2-val synthetic dataset in ``tmp_path``, registered as
    ``faults_{train,val}``; tests break its files."""
    load_prepare_synthetic().prepare_synthetic(
        str(tmp_path), seed=5, num_train=4, num_val=2, verbose=False
    )
    register_deeperlab_synthetic(str(tmp_path), prefix="faults")
    return tmp_path


def make_mapper(*opts):
    cfg = tiny_cfg("DATASETS.TRAIN", "('faults_train',)", "INPUT.MIN_SIZE_TRAIN", "(192,)", *opts)
    return DeeperLabDatasetMapper(cfg, True)


def record_with_things(name="faults_train"):
    return next(
        r for r in DatasetCatalog.get(name) if sum(s["isthing"] for s in r["segments_info"]) >= 2
    )


def rewrite_png(path, fn):
    ids = rgb2id(np.asarray(Image.open(path).convert("RGB")))
    Image.fromarray(id2rgb(fn(ids)).astype(np.uint8)).save(path)


# --------------------------------------------------------------------------------------------
# panoptic PNG vs segments_info
# --------------------------------------------------------------------------------------------
def test_png_matching_nothing_is_an_error_naming_the_file(synth_copy):
    record = record_with_things()
    listed = max(s["id"] for s in record["segments_info"])
    # ids shifted far beyond the listed ones: every pixel would silently become void
    rewrite_png(record["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + listed + 7, 0))
    with pytest.raises(AnnotationMismatchError, match=record["pan_seg_file_name"]):
        make_mapper()(record)


def test_palette_png_is_an_error_naming_the_file(synth_copy):
    record = record_with_things()
    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    # the common mistake: a palette PNG of segment indices with its own colours
    index = np.zeros(ids.shape, np.uint8)
    for i, s in enumerate(record["segments_info"]):
        index[ids == s["id"]] = i + 1
    png = Image.fromarray(index, mode="P")
    rng = np.random.default_rng(0)
    png.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())
    png.save(record["pan_seg_file_name"])
    with pytest.raises(AnnotationMismatchError, match="matches none of its segments_info"):
        make_mapper()(record)


def test_partial_mismatch_warns_once_per_file(synth_copy, caplog):
    record = record_with_things()
    gone = record["segments_info"][-1]["id"]
    # a listed segment erased from the PNG, and an id the json does not list
    rewrite_png(
        record["pan_seg_file_name"],
        lambda ids: np.where(
            ids == gone, 0, np.where(ids == record["segments_info"][0]["id"], 99999, ids)
        ),
    )
    mapper = make_mapper()
    with caplog.at_level(logging.WARNING, logger="deeperlab_d2"):
        out = mapper(record)
        mapper(record)
    warnings = [
        r.getMessage() for r in caplog.records if record["pan_seg_file_name"] in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "2 of its" in warnings[0] and f"[{gone}" in warnings[0] or str(gone) in warnings[0]
    assert "99999" in warnings[0]
    assert out["sem_seg"].numel() > 0


def test_off_by_one_png_warns(synth_copy, caplog):
    record = record_with_things()
    rewrite_png(record["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + 1, 0))
    with caplog.at_level(logging.WARNING, logger="deeperlab_d2"):
        try:
            make_mapper()(record)
        except AnnotationMismatchError as e:  # no id overlaps: that is the error case
            assert record["pan_seg_file_name"] in str(e)
            return
    assert any(record["pan_seg_file_name"] in r.getMessage() for r in caplog.records)


def test_skip_mode_replaces_the_image_and_errors_when_all_are_bad(synth_copy, caplog):
    records = DatasetCatalog.get("faults_train")
    bad = records[0]
    rewrite_png(bad["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + 100000, 0))
    with pytest.raises(AnnotationMismatchError):  # the default is "error"
        make_mapper()(bad)
    mapper = make_mapper("DATALOADER.ON_ANNOTATION_MISMATCH", "skip")
    dataset = MapSkippingMismatches(records, mapper)
    with caplog.at_level(logging.WARNING, logger="deeperlab_d2"):
        out = dataset[0]
    assert out["file_name"] == records[1]["file_name"]
    assert any(bad["pan_seg_file_name"] in r.getMessage() for r in caplog.records)
    # a dataset made entirely of such files must not train (with loss 0): an error
    for r in records[1:]:
        rewrite_png(r["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + 100000, 0))
    with pytest.raises(DatasetFileError, match="nothing to train on"):
        # a new mapper: files that passed the check once are not checked again
        MapSkippingMismatches(records, make_mapper("DATALOADER.ON_ANNOTATION_MISMATCH", "skip"))[2]


def test_bad_mismatch_mode_is_refused():
    with pytest.raises(ValueError, match="DATALOADER.ON_ANNOTATION_MISMATCH"):
        check_deeperlab_config(tiny_cfg("DATALOADER.ON_ANNOTATION_MISMATCH", "ignore"))


def test_image_without_instances_is_fine(synth_copy):
    record = dict(record_with_things())
    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    stuff = [s for s in record["segments_info"] if not s["isthing"]]
    keep = np.isin(ids, [s["id"] for s in stuff])
    Image.fromarray(id2rgb(np.where(keep, ids, 0)).astype(np.uint8)).save(
        record["pan_seg_file_name"]
    )
    record["segments_info"] = stuff
    out = make_mapper()(record)
    assert out["keypoints"].shape[0] == 0


# --------------------------------------------------------------------------------------------
# jsons
# --------------------------------------------------------------------------------------------
def _json_path(root, split="train"):
    return root / "deeperlab_synthetic" / "annotations" / f"panoptic_{split}.json"


def test_unknown_category_names_file_image_and_segment(synth_copy):
    path = _json_path(synth_copy)
    data = json.loads(path.read_text())
    ann = data["annotations"][1]
    seg = ann["segments_info"][0]
    seg["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFileError) as e:
        load_dataset("faults_train")
    msg = str(e.value)
    assert str(path) in msg and repr(ann["image_id"]) in msg and f"segment {seg['id']}" in msg
    assert "99" in msg


def test_broken_json_names_the_file(synth_copy):
    path = _json_path(synth_copy)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(DatasetFileError, match=rf"{path}.*not valid JSON"):
        load_dataset("faults_train")


def test_detectron2_registered_dataset_errors_name_the_culprit(synth_copy):
    """Detectron2's own COCO-panoptic loader raises a bare KeyError: load_dataset re-reads the
    json to name the file, image and segment."""
    from detectron2.data.datasets import register_coco_panoptic

    from deeperlab_d2.data.datasets.synthetic import get_synthetic_metadata, synthetic_split_paths

    paths = synthetic_split_paths(str(synth_copy), "train")
    name = "faults_d2_coco_panoptic"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_panoptic(
        name,
        get_synthetic_metadata(),
        paths["image_root"],
        paths["panoptic_root"],
        paths["panoptic_json"],
        paths["json_file"],
    )
    path = _json_path(synth_copy)
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][-1]["category_id"] = 77
    path.write_text(json.dumps(data))
    with pytest.raises(KeyError):
        DatasetCatalog.get(name)  # what Detectron2 alone says
    with pytest.raises(DatasetFileError, match=rf"{path}.*unknown category_id 77"):
        load_dataset(name)


def test_checked_loader_matches_detectron2(synth_copy):
    from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

    from deeperlab_d2.data.datasets.synthetic import get_synthetic_metadata, synthetic_split_paths

    paths = synthetic_split_paths(str(synth_copy), "val")
    args = (paths["panoptic_json"], paths["image_root"], paths["panoptic_root"])
    ours = load_panoptic_json(*args, get_synthetic_metadata())
    theirs = load_coco_panoptic_json(*args, get_synthetic_metadata())
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in ("file_name", "image_id", "pan_seg_file_name", "segments_info"):
            assert a[key] == b[key], key
        assert (a["height"], a["width"]) == (192, 256)


# --------------------------------------------------------------------------------------------
# configs that do not fit the data
# --------------------------------------------------------------------------------------------
def test_num_classes_mismatch_is_refused_when_the_model_is_built(synthetic_root):
    from detectron2.modeling import build_model

    cfg = tiny_cfg(
        "DATASETS.TRAIN",
        "('test_synth_train',)",
        "DATASETS.TEST",
        "('test_synth_val',)",
        "MODEL.DEEPERLAB.NUM_CLASSES",
        "5",
    )
    with pytest.raises(ValueError, match=r"MODEL.DEEPERLAB.NUM_CLASSES is 5 .* has 7 classes"):
        build_model(cfg)


@pytest.mark.parametrize("key", ["KEYPOINT_THRESHOLD", "INSTANCE_SCORE_THRESHOLD", "MIN_VOTE_PROB"])
@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_probabilities_outside_unit_interval_are_refused(key, value):
    with pytest.raises(ValueError, match=f"MODEL.DEEPERLAB.POST_PROCESS.{key}"):
        check_deeperlab_config(tiny_cfg(f"MODEL.DEEPERLAB.POST_PROCESS.{key}", value))
    check_deeperlab_config(tiny_cfg(f"MODEL.DEEPERLAB.POST_PROCESS.{key}", "1.0"))


def test_peak_threshold_is_a_vote_density_not_a_probability():
    check_deeperlab_config(tiny_cfg("MODEL.DEEPERLAB.POST_PROCESS.PEAK_THRESHOLD", "2.0"))


# --------------------------------------------------------------------------------------------
# the pre-flight check
# --------------------------------------------------------------------------------------------
def test_check_dataset_reports_every_problem_at_once(synth_copy):
    records = DatasetCatalog.get("faults_train")
    # 0: missing image; 1: corrupt panoptic PNG; 2: PNG matching nothing; 3: wrong-size sem PNG
    # plus a partial mismatch on the val split is not part of train
    (synth_copy / records[0]["file_name"]).unlink()
    with open(records[1]["pan_seg_file_name"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    rewrite_png(records[2]["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + 100000, 0))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(records[3]["sem_seg_file_name"])
    report = check_dataset("faults_train", num_classes=7, workers=2)
    text = report.format()
    assert report.num_records == 4 and report.num_errors == 4, text
    for r, what in (
        (records[0], "file_name"),
        (records[1], "pan_seg_file_name"),
        (records[2], "pan_seg_file_name"),
        (records[3], "sem_seg_file_name"),
    ):
        assert r[what] in text, (what, text)
    # a category outside NUM_CLASSES is reported too
    report = check_dataset("faults_val", num_classes=3)
    assert report.num_errors > 0 and "not a contiguous class id in [0, 3)" in report.format()
    assert check_dataset("faults_val", num_classes=7).problems == []


def test_check_dataset_reports_a_broken_json(synth_copy):
    path = _json_path(synth_copy, "val")
    path.write_text("{")
    report = check_dataset("faults_val", num_classes=7)
    assert report.num_errors == 1 and str(path) in report.format()


# --------------------------------------------------------------------------------------------
# demo on a folder with an unreadable file
# --------------------------------------------------------------------------------------------
def test_demo_skips_unreadable_images(synth_copy, tmp_path):
    from detectron2.modeling import build_model

    demo = load_repo_module("demo.py")
    cfg = tiny_cfg("DATASETS.TEST", "('faults_val',)", "DATASETS.TRAIN", "('faults_train',)")
    weights = tmp_path / "random.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for r in DatasetCatalog.get("faults_val"):
        shutil.copy(r["file_name"], folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "pictures"
    code = demo.main(
        [
            "--config-file",
            str(TINY_CONFIG),
            "--input",
            str(folder),
            "--output",
            str(out),
            "--opts",
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            str(weights),
            "DATASETS.TEST",
            "('faults_val',)",
            "DATASETS.TRAIN",
            "('faults_train',)",
        ]
    )
    assert code == 0
    drawn = sorted(p.name for p in out.iterdir())
    assert drawn == sorted(f"{p.stem}.png" for p in folder.iterdir() if p.name != "broken.jpg")


def test_train_net_check_data_reports_and_fails(synth_copy, tmp_path):
    train_net = load_repo_module("train_net.py")
    records = DatasetCatalog.get("faults_val")
    (synth_copy / records[0]["file_name"]).unlink()

    def run():
        args = train_net.default_argument_parser().parse_args(
            [
                "--config-file",
                str(TINY_CONFIG),
                "--check-data",
                "MODEL.DEVICE",
                "cpu",
                "DATASETS.TRAIN",
                "('faults_train',)",
                "DATASETS.TEST",
                "('faults_val',)",
                "OUTPUT_DIR",
                str(tmp_path / "out"),
            ]
        )
        return train_net.main(args)

    assert run() == 1
    text = (tmp_path / "out" / "log.txt").read_text()  # train_net's logger writes there
    assert "Data check (1 errors" in text and records[0]["file_name"] in text
    assert "dataset 'faults_train': 4 records checked, 0 errors" in text
    shutil.copy(DatasetCatalog.get("faults_val")[1]["file_name"], records[0]["file_name"])
    assert run() == 0  # a wrong picture, but a readable one of the right size


def test_trainer_skips_mismatched_images_in_skip_mode(synth_copy, tmp_path):
    """The Trainer's loader: with "skip" a bad image is replaced, with "error" it stops."""
    from deeperlab_d2.engine import Trainer

    records = DatasetCatalog.get("faults_train")
    for r in records[:2]:
        rewrite_png(r["pan_seg_file_name"], lambda ids: np.where(ids > 0, ids + 100000, 0))
    cfg = tiny_cfg(
        "DATASETS.TRAIN",
        "('faults_train',)",
        "INPUT.MIN_SIZE_TRAIN",
        "(192,)",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "4",
    )
    cfg.DATALOADER.ON_ANNOTATION_MISMATCH = "skip"
    batch = next(iter(Trainer.build_train_loader(cfg)))
    good = {records[2]["file_name"], records[3]["file_name"]}
    assert len(batch) == 4 and {b["file_name"] for b in batch} <= good
    cfg.DATALOADER.ON_ANNOTATION_MISMATCH = "error"
    with pytest.raises(AnnotationMismatchError):
        for _ in zip(range(3), Trainer.build_train_loader(cfg)):
            pass
