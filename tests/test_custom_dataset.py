"""The "Your own dataset" guide of datasets/README.md, followed literally on a fake dataset: its
prepare command, its Python launcher and its YAML config (taken from the README between the
``custom-data-snippet`` markers), then --check-data, a training step and --eval-only."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_repo_module
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from deeperlab_d2.data.datasets import contiguous_id_map

REPO = Path(__file__).resolve().parents[1]
README = REPO / "datasets" / "README.md"
SCRIPT = REPO / "datasets" / "prepare_coco_semantic_from_panoptic.py"
HEIGHT, WIDTH = 64, 128
# list order != contiguous order: things first -> widget 0, floor 1, wall 2
CATEGORIES = [
    {"id": 20, "name": "floor", "isthing": 0, "color": [128, 64, 128]},
    {"id": 10, "name": "widget", "isthing": 1},  # no colour: one is made up
    {"id": 30, "name": "wall", "isthing": 0, "color": [70, 70, 70]},
]
CONTIGUOUS = {10: 0, 20: 1, 30: 2}


def snippet(kind: str) -> str:
    text = README.read_text()
    start, end = f"<!-- custom-data-snippet:{kind} -->", f"<!-- /custom-data-snippet:{kind} -->"
    match = re.search(rf"{start}\n```{kind}\n(.*?)```\n{end}", text, re.S)
    assert match, f"no {kind} snippet in {README}"
    return match.group(1)


def make_fake_dataset(root: Path) -> dict:
    """The guide's layout; image names differ from the PNG names (images[].file_name)."""
    expected = {}
    for s, split in enumerate(("train", "val")):
        for sub in ("images", "panoptic"):
            (root / sub / split).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(2):
            rng = np.random.default_rng([s, i])
            pan = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
            pan[:30], pan[31:] = 1, 2  # wall / floor, void line between
            segments = [(1, 30, 0), (2, 20, 0)]
            for k in range(3):
                y, x = int(rng.integers(2, 40)), 6 + 40 * k + int(rng.integers(0, 8))
                pan[y : y + 16, x : x + 14] = 100 + k
                segments.append((100 + k, 10, int(k == 2 and i == 0)))  # one crowd
            rgb = np.stack([pan % 256, pan // 256 % 256, pan // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "panoptic" / split / f"pan_{i}.png")
            photo = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(photo).save(root / "images" / split / f"photo_{i}.jpg")
            images.append(
                {"id": i, "file_name": f"photo_{i}.jpg", "height": HEIGHT, "width": WIDTH}
            )
            infos = []
            labels = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
            for seg_id, cat, crowd in segments:
                ys, xs = np.nonzero(pan == seg_id)
                bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                infos.append(
                    {
                        "id": seg_id,
                        "category_id": cat,
                        "iscrowd": crowd,
                        "area": len(ys),
                        "bbox": bbox,
                    }
                )
                if not crowd:
                    labels[pan == seg_id] = CONTIGUOUS[cat]
            annotations.append({"image_id": i, "file_name": f"pan_{i}.png", "segments_info": infos})
            expected[(split, f"pan_{i}.png")] = labels
        with open(root / "annotations" / f"panoptic_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return expected


@pytest.fixture
def guide(tmp_path, monkeypatch):
    """The fake dataset, its semantic PNGs (the guide's step 1), and the guide's launcher and
    config written to ``tmp_path`` with the dataset root replaced."""
    data = tmp_path / "my_dataset"
    expected = make_fake_dataset(data)
    for split in ("train", "val"):  # step 1, as in the guide (parallel)
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--workers", "2",
             "--panoptic-json", str(data / "annotations" / f"panoptic_{split}.json"),
             "--panoptic-root", str(data / "panoptic" / split),
             "--output", str(data / "semseg" / split)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "2 semantic PNGs written" in proc.stdout
    for (split, png), labels in expected.items():
        np.testing.assert_array_equal(np.asarray(Image.open(data / "semseg" / split / png)), labels)

    code = snippet("python")
    assert 'ROOT = "/data/my_dataset"' in code
    launcher = tmp_path / "train_my_dataset.py"
    launcher.write_text(code.replace('"/data/my_dataset"', repr(str(data))))
    yaml = snippet("yaml")
    base = '_BASE_: "../coco/deeperlab_WMNV2_os16_poly_200k_bs64_crop640.yaml"'
    assert base in yaml
    config = tmp_path / "configs" / "my_dataset" / "deeperlab_WMNV2_my_dataset.yaml"
    config.parent.mkdir(parents=True)
    coco_config = REPO / "configs" / "coco" / "deeperlab_WMNV2_os16_poly_200k_bs64_crop640.yaml"
    config.write_text(yaml.replace(base, f'_BASE_: "{coco_config}"'))

    monkeypatch.syspath_prepend(str(REPO))  # `import train_net`, as next to train_net.py
    spec = importlib.util.spec_from_file_location("train_my_dataset", launcher)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers my_dataset_{train,val}
    yield module, config, data
    for split in ("train", "val"):
        DatasetCatalog.pop(f"my_dataset_{split}", None)
        MetadataCatalog.pop(f"my_dataset_{split}", None)


def test_script_and_package_agree_on_contiguous_ids():
    prepare = load_repo_module("datasets/prepare_coco_semantic_from_panoptic.py")
    assert prepare.contiguous_id_map(CATEGORIES) == contiguous_id_map(CATEGORIES) == CONTIGUOUS


def test_guide_registers_checks_trains_and_evaluates(guide, tmp_path):
    module, config, data = guide
    meta = MetadataCatalog.get("my_dataset_val")
    assert meta.thing_classes == ["widget"]
    assert meta.stuff_classes == ["widget", "floor", "wall"]
    assert meta.thing_dataset_id_to_contiguous_id == {10: 0}
    assert meta.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
    assert len(meta.stuff_colors) == 3 and meta.evaluator_type == "coco_panoptic_seg"
    records = DatasetCatalog.get("my_dataset_train")
    assert [Path(r["file_name"]).name for r in records] == ["photo_0.jpg", "photo_1.jpg"]
    assert records[0]["sem_seg_file_name"] == str(data / "semseg" / "train" / "pan_0.png")
    assert {s["category_id"] for s in records[0]["segments_info"]} == {0, 1, 2}

    out = tmp_path / "output"
    opts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.DEEPERLAB.NORM", "BN",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", f"({HEIGHT},)",
        "INPUT.MAX_SIZE_TRAIN", str(WIDTH),
        "INPUT.CROP.SIZE", f"({HEIGHT}, {WIDTH})",
        "INPUT.MIN_SIZE_TEST", str(HEIGHT),
        "INPUT.MAX_SIZE_TEST", str(WIDTH),
        "SOLVER.MAX_ITER", "1",
        "SOLVER.IMS_PER_BATCH", "2",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    cfg = ["--config-file", str(config)]
    assert module.main(cfg + ["--check-data"] + opts) == 0
    module.main(cfg + opts)
    assert (out / "model_final.pth").is_file()
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    module.main(cfg + ["--eval-only"] + opts + weights)
    log = (out / "log.txt").read_text()
    summary = log[log.rindex("Evaluation summary:") :].splitlines()
    assert summary[1].startswith("| dataset | PQ |")
    row = summary[3]
    assert row.startswith("| my_dataset_val |")
    # PQ, ..., PC, ..., mIoU are numbers (box / mask AP: "-", no instances json)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert all(re.fullmatch(r"\d+\.\d\d", c) for c in cells[:9]), row
