"""``train_net.py --resume`` continues a training exactly: the model, the iteration, the optimizer
state (Adam moments, SGD momentum) and the LR schedule come back, so a training interrupted and
resumed ends with the same parameters as an uninterrupted one (bit for bit, on CPU). And a
broken ``last_checkpoint`` never makes it silently start again from iteration 0.

The training data is one image without random augmentation, so every batch is the same and
the comparison does not depend on the data order (Detectron2's TrainingSampler restarts its
stream on resume)."""

import copy
import logging
import shutil

import pytest
import torch
from conftest import TINY_CONFIG, load_prepare_synthetic, load_repo_module
from detectron2.engine import HookBase

MAX_ITER = 4
STOP_AT = 2  # run B stops after this many iterations (its checkpoint: model_0000001.pth)


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic

    root = tmp_path_factory.mktemp("resume_one")
    load_prepare_synthetic().prepare_synthetic(
        str(root), seed=5, num_train=1, num_val=1, height=96, width=128, verbose=False
    )
    register_deeperlab_synthetic(str(root), prefix="resume_one")
    return root


@pytest.fixture(scope="module")
def train_net():
    return load_repo_module("train_net.py")


class Interrupted(Exception):
    pass


class Record(HookBase):
    """Records, before every step, the optimizer and LR-scheduler state; raises Interrupted
    after ``stop_after`` iterations (after the periodic checkpointer, which runs earlier)."""

    def __init__(self, log, stop_after=None):
        self.log, self.stop_after = log, stop_after

    def before_step(self):
        self.log[self.trainer.iter] = {
            "optimizer": copy.deepcopy(self.trainer.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.trainer.scheduler.state_dict()),
        }

    def after_step(self):
        if self.stop_after is not None and self.trainer.iter + 1 == self.stop_after:
            raise Interrupted(f"stopped after {self.stop_after} iterations")


def train(train_net, monkeypatch, out_dir, optimizer, record, *opts, resume=False):
    """train_net.main with ``record`` appended to the trainer's hooks."""
    build_hooks = train_net.Trainer.build_hooks
    monkeypatch.setattr(train_net.Trainer, "build_hooks", lambda self: build_hooks(self) + [record])
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(TINY_CONFIG)]
        + (["--resume"] if resume else [])
        + [
            "MODEL.DEVICE",
            "cpu",
            "SEED",
            "11",  # the same initial weights in every run
            "DATASETS.TRAIN",
            "('resume_one_train',)",
            "DATASETS.TEST",
            "()",
            "DATALOADER.NUM_WORKERS",
            "0",
            "INPUT.MIN_SIZE_TRAIN",
            "(96,)",
            "INPUT.CROP.ENABLED",
            "False",
            "INPUT.RANDOM_FLIP",
            "none",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.OPTIMIZER",
            optimizer,
            "SOLVER.BASE_LR",
            "0.01",
            "SOLVER.MAX_ITER",
            str(MAX_ITER),
            "SOLVER.CHECKPOINT_PERIOD",
            str(STOP_AT),
            "OUTPUT_DIR",
            str(out_dir),
            *opts,
        ]
    )
    return train_net.main(args)


def assert_same(a, b, where=""):
    """Recursive exact equality of (optimizer) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "optimizer, state_key", [("ADAM", "exp_avg_sq"), ("SGD", "momentum_buffer")]
)
def test_interrupted_and_resumed_training_equals_uninterrupted(
    one_image, train_net, monkeypatch, tmp_path, optimizer, state_key
):
    log_a, log_b, log_resumed = {}, {}, {}
    train(train_net, monkeypatch, tmp_path / "a", optimizer, Record(log_a))
    with pytest.raises(Interrupted):
        train(train_net, monkeypatch, tmp_path / "b", optimizer, Record(log_b, STOP_AT))
    assert (tmp_path / "b" / "last_checkpoint").read_text() == f"model_{STOP_AT - 1:07d}.pth"
    assert sorted(log_b) == list(range(STOP_AT))
    train(train_net, monkeypatch, tmp_path / "b", optimizer, Record(log_resumed), resume=True)

    # resumed at the next iteration, with the optimizer and scheduler state of run A there
    assert sorted(log_resumed) == list(range(STOP_AT, MAX_ITER))
    resumed = log_resumed[STOP_AT]
    assert resumed["optimizer"]["state"], "the optimizer state was not restored"
    assert all(state_key in s for s in resumed["optimizer"]["state"].values())
    assert_same(resumed["optimizer"], log_a[STOP_AT]["optimizer"], "optimizer")
    assert_same(resumed["scheduler"], log_a[STOP_AT]["scheduler"], "scheduler")
    # in particular the learning rate of that iteration (the poly schedule has moved on)
    lrs = [g["lr"] for g in resumed["optimizer"]["param_groups"]]
    assert lrs == [g["lr"] for g in log_a[STOP_AT]["optimizer"]["param_groups"]]
    assert lrs != [g["lr"] for g in log_a[0]["optimizer"]["param_groups"]]
    for it in range(STOP_AT + 1, MAX_ITER):
        assert_same(log_resumed[it]["optimizer"], log_a[it]["optimizer"], f"iteration {it}")

    final_a = torch.load(tmp_path / "a" / "model_final.pth", map_location="cpu")
    final_b = torch.load(tmp_path / "b" / "model_final.pth", map_location="cpu")
    at_stop = torch.load(tmp_path / "a" / f"model_{STOP_AT - 1:07d}.pth", map_location="cpu")
    assert final_a["iteration"] == final_b["iteration"] == MAX_ITER - 1
    assert set(final_a["model"]) == set(final_b["model"])
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    # and the resumed iterations did train
    assert any(not torch.equal(v, at_stop["model"][k]) for k, v in final_a["model"].items())


# --------------------------------------------------------------------------------------------
# a missing, empty or broken last_checkpoint
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(one_image, train_net, tmp_path_factory):
    """OUTPUT_DIR of a finished 4-iteration training: model_0000001.pth, model_0000003.pth,
    model_final.pth, last_checkpoint -> model_final.pth."""
    out = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        train(train_net, mp, out, "ADAM", Record({}))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    return out


@pytest.fixture
def output_dir(checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(checkpoints, out)
    return out


def resume(train_net, monkeypatch, out_dir, max_iter=MAX_ITER):
    """Resume the training in ``out_dir`` with SOLVER.MAX_ITER ``max_iter``; returns the
    iterations it trained and the optimizer state before each."""
    log = {}
    train(
        train_net,
        monkeypatch,
        out_dir,
        "ADAM",
        Record(log),
        "SOLVER.MAX_ITER",
        str(max_iter),
        resume=True,
    )
    return log


def test_resume_continues_at_next_iteration(train_net, monkeypatch, output_dir):
    """The everyday case: last_checkpoint names a good checkpoint; a longer schedule goes on."""
    log = resume(train_net, monkeypatch, output_dir, max_iter=MAX_ITER + 1)
    assert sorted(log) == [MAX_ITER]
    assert log[MAX_ITER]["optimizer"]["state"]


def test_resume_without_last_checkpoint_uses_newest_checkpoint(
    train_net, monkeypatch, output_dir, caplog
):
    (output_dir / "last_checkpoint").unlink()
    (output_dir / "model_final.pth").unlink()
    with caplog.at_level(logging.WARNING):
        log = resume(train_net, monkeypatch, output_dir, max_iter=MAX_ITER + 1)
    # from model_0000003.pth, at iteration 4; not from iteration 0 over the old checkpoints
    assert sorted(log) == [MAX_ITER]
    assert "resuming from" in caplog.text and "model_0000003.pth" in caplog.text
    assert "last_checkpoint does not exist" in caplog.text


@pytest.mark.parametrize(
    "fault, resumed_from, message",
    [
        ("empty", "model_final.pth", "last_checkpoint is empty"),
        ("missing file", "model_final.pth", "names 'model_0000009.pth', which does not exist"),
        ("corrupt file", "model_0000003.pth", "cannot read checkpoint"),
        ("truncated file", "model_0000003.pth", "cannot read checkpoint"),
    ],
)
def test_broken_last_checkpoint_falls_back_with_a_warning(
    train_net, monkeypatch, output_dir, caplog, fault, resumed_from, message
):
    tag = output_dir / "last_checkpoint"
    final = output_dir / "model_final.pth"
    if fault == "empty":
        tag.write_text("")
    elif fault == "missing file":
        tag.write_text("model_0000009.pth")
    elif fault == "corrupt file":
        final.write_bytes(b"not a checkpoint")
    else:
        data = final.read_bytes()
        final.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        log = resume(train_net, monkeypatch, output_dir, max_iter=MAX_ITER + 1)
    assert sorted(log) == [MAX_ITER]  # resumed after iteration 3, not from 0
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"resuming from {output_dir / resumed_from}" in warnings
    assert message in warnings
    if fault.endswith("file") and fault != "missing file":
        assert str(final) in warnings


def test_resume_stops_when_no_checkpoint_can_be_loaded(train_net, monkeypatch, output_dir):
    for path in output_dir.glob("model_*.pth"):
        path.write_bytes(b"")
    with pytest.raises(RuntimeError, match="no checkpoint in .* can be resumed from") as e:
        resume(train_net, monkeypatch, output_dir)
    assert "model_final.pth" in str(e.value) and "model_0000001.pth" in str(e.value)


def test_resume_refuses_checkpoint_of_another_model(train_net, monkeypatch, output_dir):
    """Resuming with a changed model config would train on with those parameters random."""
    with pytest.raises(RuntimeError, match="does not fit the model") as e:
        train(
            train_net,
            monkeypatch,
            output_dir,
            "ADAM",
            Record({}),
            "MODEL.DEEPERLAB.SEM_SEG_HEAD_CHANNELS",
            "48",
            resume=True,
        )
    assert str(output_dir / "model_final.pth") in str(e.value)
    assert "sem_seg_head.tower" in str(e.value)


def test_resume_with_other_parameter_groups_names_the_solver_keys(
    train_net, monkeypatch, output_dir
):
    """A weight decay that splits the parameters into other groups than the saved optimizer's
    stops the resume with a message naming the solver keys and the way out."""
    with pytest.raises(RuntimeError, match="state in .* does not fit this run") as e:
        train(
            train_net,
            monkeypatch,
            output_dir,
            "ADAM",
            Record({}),
            "SOLVER.WEIGHT_DECAY",
            "0.0001",
            resume=True,
        )
    assert "SOLVER.WEIGHT_DECAY" in str(e.value)
    assert f"MODEL.WEIGHTS {output_dir / 'model_final.pth'}" in str(e.value)
