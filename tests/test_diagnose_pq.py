"""benchmarks/diagnose_pq.py swaps a model's head outputs for ideal ones branch by branch, for
either instance representation; the stuff segments depend on the semantic branch only, which
pins down several rows exactly."""

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, load_repo_module, tiny_cfg
from PIL import Image


@pytest.mark.parametrize("representation", ["keypoints", "center"])
def test_diagnose_rows_are_consistent(synthetic_root, tmp_path, representation):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    opts = ["MODEL.DEEPERLAB.INSTANCE_REPRESENTATION", representation]
    torch.manual_seed(0)
    weights = tmp_path / "untrained.pth"
    model = build_model(tiny_cfg(*opts))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("untrained")
    diagnose = load_repo_module("benchmarks/diagnose_pq.py")
    rows, (classes, counts) = diagnose.diagnose(
        str(synthetic_root), "val", str(TINY_CONFIG), str(weights), opts
    )
    assert list(rows) == ["model", "ideal semantics", "ideal instances", "ideal"]
    pq = {
        name: {k: 100 * v["pq"] for k, v in r.items() if k != "per_class"}
        for name, r in rows.items()
    }
    # ideal semantics -> every stuff segment exact
    assert pq["ideal semantics"]["Stuff"] == 100.0 and pq["ideal"]["Stuff"] == 100.0
    # same (predicted) semantics -> same stuff segments
    assert pq["ideal instances"]["Stuff"] == pq["model"]["Stuff"]
    assert pq["ideal"]["All"] >= 90.0
    # an untrained model finds no correct thing
    assert pq["model"]["Things"] < 5.0
    # the confusion matrix counts every labelled (non-crowd) val pixel once
    assert len(classes) == 7 and counts.shape == (7, 7)
    assert counts.sum() == sum(
        int((np.asarray(Image.open(p)) < 7).sum())
        for p in sorted(
            (synthetic_root / "deeperlab_synthetic" / "panoptic_semseg_val").glob("*.png")
        )
    )
