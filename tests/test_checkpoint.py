"""``train_net.py --eval-only`` and ``demo.py`` stop with an error naming the file and the keys
when the checkpoint does not fit the model (Detectron2 only logs a warning and leaves those
parameters random) or when MODEL.WEIGHTS is empty, unless ``--allow-random-weights``."""

import logging

import pytest
import torch
from conftest import TINY_CONFIG, load_repo_module, tiny_cfg

DATASETS = ["DATASETS.TRAIN", "('test_synth_train',)", "DATASETS.TEST", "('test_synth_val',)"]


def build_model(*opts, seed=0):
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(tiny_cfg(*DATASETS, *opts))


def nine_class_model():
    """A model for another dataset, of 9 classes (a bigger semantic-segmentation predictor)."""
    return build_model(
        "MODEL.DEEPERLAB.NUM_CLASSES", "9", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"
    )


def eval_only(tmp_path, weights, *flags):
    train_net = load_repo_module("train_net.py")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(TINY_CONFIG), "--eval-only", *flags]
        + ["MODEL.DEVICE", "cpu", *DATASETS, "DATALOADER.NUM_WORKERS", "0"]
        + ["OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.WEIGHTS", str(weights)]
    )
    return train_net.main(args)


def test_eval_only_rejects_checkpoint_of_another_num_classes(synthetic_root, tmp_path):
    other = nine_class_model().state_dict()
    weights = tmp_path / "nine_classes.pth"
    torch.save({"model": other}, weights)
    model = build_model().state_dict()
    different = [k for k, v in model.items() if other[k].shape != v.shape]
    assert different  # the semantic-segmentation predictor
    with pytest.raises(RuntimeError, match="does not fit the model") as e:
        eval_only(tmp_path, weights)
    message = str(e.value)
    assert str(weights) in message and "different shape" in message
    for key in different:
        assert f"{key} ({tuple(other[key].shape)} in the checkpoint" in message


def test_eval_only_rejects_checkpoint_missing_a_parameter(synthetic_root, tmp_path):
    model = build_model()
    state = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    deleted = names[len(names) // 2]
    del state[deleted]
    weights = tmp_path / "incomplete.pth"
    torch.save({"model": state}, weights)
    with pytest.raises(RuntimeError, match="does not fit the model") as e:
        eval_only(tmp_path, weights)
    assert str(weights) in str(e.value)
    assert f"1 parameters/buffers missing from the checkpoint: {deleted}" in str(e.value)


def test_eval_only_with_empty_weights_needs_the_flag(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty.*--allow-random-weights"):
        eval_only(tmp_path, "")
    results = eval_only(tmp_path, "", "--allow-random-weights")
    assert "PQ" in results["panoptic_seg"]


def test_load_model_weights_accepts_training_checkpoints(synthetic_root, tmp_path, caplog):
    """Checkpoints written by training hold trainer / optimizer / scheduler state besides the
    model, and no non-persistent buffers (pixel_mean/std): they load without a complaint."""
    from deeperlab_d2.checkpoint import load_model_weights

    trained = build_model()
    optimizer = torch.optim.Adam(trained.parameters())
    state = trained.state_dict()
    assert "pixel_mean" not in state and "pixel_mean" in dict(trained.named_buffers())
    weights = tmp_path / "model_final.pth"
    torch.save(
        {
            "model": state,
            "trainer": {
                "iteration": 9,
                "hooks": {"LRScheduler": {"base_lrs": [0.1], "last_epoch": 10}},
                "_trainer": {"iteration": 9, "optimizer": optimizer.state_dict()},
            },
            "iteration": 9,
        },
        weights,
    )
    model = build_model(seed=1)
    assert not torch.equal(next(model.parameters()), next(trained.parameters()))
    with caplog.at_level(logging.WARNING, logger="deeperlab_d2"):
        load_model_weights(model, str(weights))
    assert not caplog.records
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.pixel_mean, trained.pixel_mean)


def test_load_model_weights_unreadable_and_allowed_random(synthetic_root, tmp_path, caplog):
    from deeperlab_d2.checkpoint import CheckpointError, load_model_weights

    model = build_model()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_model_weights(model, str(tmp_path / "nowhere.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {broken}"):
        load_model_weights(model, str(broken))
    # explicitly allowed: a checkpoint that does not fit leaves those parameters random
    other = nine_class_model()
    weights = tmp_path / "nine_classes.pth"
    torch.save({"model": other.state_dict()}, weights)
    with caplog.at_level(logging.WARNING, logger="deeperlab_d2"):
        load_model_weights(model, str(weights), allow_random=True)
    assert "does not fit the model" in caplog.text and "stay random" in caplog.text
    shared = [k for k, v in model.state_dict().items() if v.shape == other.state_dict()[k].shape]
    assert all(torch.equal(model.state_dict()[k], other.state_dict()[k]) for k in shared)


def test_demo_refuses_empty_or_mismatched_weights(synthetic_root, tmp_path):
    demo = load_repo_module("demo.py")
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        demo.Demo(tiny_cfg(*DATASETS, "MODEL.WEIGHTS", ""))
    weights = tmp_path / "nine_classes.pth"
    torch.save({"model": nine_class_model().state_dict()}, weights)
    with pytest.raises(RuntimeError, match=f"checkpoint {weights} does not fit the model"):
        demo.Demo(tiny_cfg(*DATASETS, "MODEL.WEIGHTS", str(weights)))

    # --allow-random-weights: pictures of an untrained model
    image = next((synthetic_root / "deeperlab_synthetic" / "val").iterdir())
    argv = ["--config-file", str(TINY_CONFIG), "--input", str(image), "--output"]
    opts = ["--opts", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *DATASETS]
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        demo.main(argv + [str(tmp_path / "refused"), *opts])
    assert demo.main(argv + [str(tmp_path / "random"), "--allow-random-weights", *opts]) == 0
    assert (tmp_path / "random" / f"{image.stem}.png").is_file()
