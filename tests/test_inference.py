"""DeeperLab in eval mode returns Detectron2's standard outputs at the original size."""

import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances


def test_eval_outputs_detectron2_format(synthetic_root):
    cfg = tiny_cfg("DATASETS.TEST", "('test_synth_val',)")
    model = build_model(cfg).eval()
    rec = DatasetCatalog.get("test_synth_val")[0]
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)  # a resized test input
    batch = [
        {"image": image, "height": rec.get("height", 192), "width": rec.get("width", 256)},
        {"image": image[:, :80, :100]},  # no height/width: stays at the input size
    ]
    with torch.no_grad():
        out = model(batch)
    assert out[0]["sem_seg"].shape == (7, 192, 256)
    pan, segments = out[0]["panoptic_seg"]
    assert pan.shape == (192, 256) and pan.dtype == torch.int32
    ids = {s["id"] for s in segments}
    assert set(pan.unique().tolist()) <= ids | {0}
    for s in segments:
        assert set(s) >= {"id", "category_id", "isthing", "score"}
    inst = out[0]["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (192, 256)
    assert len(inst) == sum(s["isthing"] for s in segments)
    assert out[1]["panoptic_seg"][0].shape == (80, 100)
    assert out[1]["sem_seg"].shape == (7, 80, 100)
