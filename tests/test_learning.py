"""The tiny DeeperLab actually learns: it overfits two synthetic images."""

import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from deeperlab_d2.data import DeeperLabDatasetMapper


def test_tiny_model_overfits_two_images(synthetic_root):
    torch.manual_seed(0)
    cfg = tiny_cfg(
        "DATASETS.TRAIN",
        "('test_synth_train',)",
        "INPUT.MIN_SIZE_TRAIN",
        "(192,)",
        "INPUT.RANDOM_FLIP",
        "none",
    )
    mapper = DeeperLabDatasetMapper(cfg, True)
    batch = [mapper(r) for r in DatasetCatalog.get("test_synth_train")[:2]]
    model = build_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(80):
        losses = model(batch)
        assert set(losses) == {
            "loss_sem_seg",
            "loss_heatmap",
            "loss_short_offset",
            "loss_mid_offset",
            "loss_long_offset",
        }
        total = sum(losses.values())
        history.append({k: v.item() for k, v in losses.items()} | {"total": total.item()})
        opt.zero_grad()
        total.backward()
        opt.step()
    first, last = history[0], history[-1]
    assert last["total"] < first["total"] / 4, (first, last)
    for key in ("loss_short_offset", "loss_mid_offset", "loss_long_offset"):
        assert last[key] < first[key] / 5, (key, first, last)
    assert last["loss_sem_seg"] < first["loss_sem_seg"] / 3, (first, last)
