"""The instance-branch seam: selection by config, the mapper making the selected branch's
targets, a training step through each branch (dual decoder included), and a new
representation plugged in by registration alone."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from deeperlab_d2.data import DeeperLabDatasetMapper
from deeperlab_d2.modeling import (
    INSTANCE_BRANCHES_REGISTRY,
    CenterBranch,
    KeypointBranch,
    get_instance_branch_class,
)
from deeperlab_d2.modeling.instance_branches import InstanceBranch


def cfg_for(representation, *opts):
    return tiny_cfg(
        "MODEL.DEEPERLAB.INSTANCE_REPRESENTATION",
        representation,
        "DATASETS.TRAIN",
        "('test_synth_train',)",
        "DATASETS.TEST",
        "('test_synth_val',)",
        "INPUT.MIN_SIZE_TRAIN",
        "(192,)",
        *opts,
    )


def test_selection_by_config():
    assert get_instance_branch_class(cfg_for("keypoints")) is KeypointBranch
    assert get_instance_branch_class(cfg_for("center")) is CenterBranch
    with pytest.raises(ValueError, match="MODEL.DEEPERLAB.INSTANCE_REPRESENTATION.*'centre'"):
        get_instance_branch_class(cfg_for("centre"))


@pytest.mark.parametrize("representation", ["keypoints", "center"])
def test_mapper_makes_the_branch_targets_and_a_training_step_runs(synthetic_root, representation):
    cfg = cfg_for(representation, "MODEL.DEEPERLAB.DUAL_DECODER", "True")
    branch = get_instance_branch_class(cfg)
    mapper = DeeperLabDatasetMapper(cfg, True)
    batch = [mapper(r) for r in DatasetCatalog.get("test_synth_train")[:2]]
    for key in ("sem_seg", "sem_seg_weights", *branch.target_pad_values):
        assert key in batch[0], key
    model = build_model(cfg).train()
    losses = model(batch)
    expected = {
        "keypoints": {"loss_heatmap", "loss_short_offset", "loss_mid_offset", "loss_long_offset"},
        "center": {"loss_center_heatmap", "loss_center_offset"},
    }[representation]
    assert set(losses) == {"loss_sem_seg"} | expected
    sum(losses.values()).backward()
    for name, p in model.instance_branch.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the dual layout, for any representation: its own ASPP + decoder learns
    assert model.instance_branch.decoder is not None
    assert any(p.grad.abs().sum() > 0 for p in model.instance_branch.decoder.parameters())
    # the shared decoder now serves the semantic head only
    sem_only = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert sem_only and model.instance_branch.decoder is not model.decoder
    # the ideal outputs of one image's targets have the shapes of the branch's outputs
    model.eval()
    with torch.no_grad():
        out = model.predict(model.preprocess([batch[0]["image"]]).tensor)
    ideal = branch.ideal_outputs(batch[0])
    for key in branch.output_names:
        assert ideal[key].shape[:-2] == out[key].shape[:-2], key


def test_a_new_representation_plugs_in_by_registration(synthetic_root):
    """A toy branch (every thing pixel one instance) registered under a new name: the mapper,
    training and inference of the meta-architecture use it with no other change."""

    class WholeThingBranch(InstanceBranch):
        representation = "test_whole_thing"
        target_pad_values = {"thing_mask": 0.0}
        output_names = ("objectness",)

        def __init__(self, cfg, in_channels, backbone_shapes=None):
            super().__init__()
            self.head = torch.nn.Conv2d(in_channels, 1, 1)
            self.post_process = type("P", (), {"thing_area": 0, "stuff_area": 0})()

        @classmethod
        def target_generator_from_config(cls, cfg, thing_ids):
            keypoints = KeypointBranch.target_generator_from_config(cfg, thing_ids)

            def generate(panoptic, segments_info):
                t = keypoints(panoptic, segments_info)
                return {
                    "sem_seg": t["sem_seg"],
                    "sem_seg_weights": t["sem_seg_weights"],
                    "thing_mask": t["long_offset_weights"],
                }

            return generate

        def forward(self, x, features, size, valid_sizes=None):
            up = torch.nn.functional.interpolate(self.head(x), size=size, mode="bilinear")
            return {"objectness": up}

        def losses(self, outputs, targets):
            return {
                "loss_objectness": torch.nn.functional.binary_cross_entropy_with_logits(
                    outputs["objectness"][:, 0], targets["thing_mask"]
                )
            }

        @staticmethod
        def ideal_outputs(targets):
            return {"objectness": targets["thing_mask"][None, None] * 20 - 10}

        def instance_inference(self, sem_seg_logits, semantic, thing_mask, **outputs):
            return [
                {
                    "instance_map": torch.where(m, 0, -1).long(),
                    "instance_scores": torch.ones(1),
                }
                for m in thing_mask
            ]

    INSTANCE_BRANCHES_REGISTRY.register(WholeThingBranch)
    try:
        cfg = cfg_for("test_whole_thing")
        mapper = DeeperLabDatasetMapper(cfg, True)
        batch = [mapper(r) for r in DatasetCatalog.get("test_synth_train")[:2]]
        model = build_model(cfg)
        assert set(model.train()(batch)) == {"loss_sem_seg", "loss_objectness"}
        with torch.no_grad():
            (out,) = model.eval()([{"image": batch[0]["image"]}])
        pan, segments = out["panoptic_seg"]
        assert sum(s["isthing"] for s in segments) <= 1
        assert pan.shape == batch[0]["image"].shape[-2:]
    finally:
        INSTANCE_BRANCHES_REGISTRY._obj_map.pop("WholeThingBranch")


def test_training_step_of_the_benchmarks_updates_the_weights(synthetic_root):
    """``engine.training_step`` (the step that benchmarks/bench_train_throughput.py and
    profile_train_step.py time) builds what the trainer builds and takes an optimizer step."""
    from deeperlab_d2.engine import training_step

    cfg = cfg_for("keypoints", "SOLVER.IMS_PER_BATCH", "2")
    cfg.freeze()
    torch.manual_seed(0)
    step = training_step(cfg)
    model = step.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert model.training and len(changed) > len(before) // 2
