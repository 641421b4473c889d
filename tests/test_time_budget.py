"""``train_net.py --train-minutes``: the schedule is planned from the measured step time
(``deeperlab_d2.engine.time_budget_schedule``), kept in OUTPUT_DIR and reused on --resume."""

import json

import pytest
from conftest import TINY_CONFIG, load_repo_module, tiny_cfg

from deeperlab_d2 import engine

SYNTH = ["DATASETS.TRAIN", "('test_synth_train',)", "DATASETS.TEST", "('test_synth_val',)"]


def test_measure_step_time_runs_training_steps(synthetic_root, monkeypatch):
    calls = []
    build = engine.training_step

    def counting(cfg):
        step = build(cfg)

        def wrapped():
            calls.append(1)
            step()

        return wrapped

    monkeypatch.setattr(engine, "training_step", counting)
    cfg = tiny_cfg(*SYNTH, "INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.IMS_PER_BATCH", "2")
    seconds = engine.measure_step_time(cfg, steps=2, warmup=1)
    assert seconds > 0 and len(calls) == 3
    with pytest.raises(ValueError, match="steps must be >= 1"):
        engine.measure_step_time(cfg, steps=0)


def test_time_budget_schedule_plans_keeps_and_scales(tmp_path, monkeypatch):
    step_time = [0.25]
    monkeypatch.setattr(engine, "measure_step_time", lambda cfg, **kw: step_time[0])
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.STEPS", "(300, 900)")
    assert cfg.SOLVER.MAX_ITER == 1200
    plan = engine.time_budget_schedule(cfg, 2.0)
    assert plan == {
        "max_iter": 480,  # 120 s / 0.25 s
        "seconds_per_iter": 0.25,
        "minutes": 2.0,
        "config_max_iter": 1200,
    }
    assert json.loads((tmp_path / "schedule.json").read_text()) == plan
    # a resumed run keeps its plan whatever the machine measures now; a new run plans again
    step_time[0] = 1.0
    assert engine.time_budget_schedule(cfg, 2.0, resume=True) == plan
    assert engine.time_budget_schedule(cfg, 2.0)["max_iter"] == 120
    assert engine.time_budget_schedule(cfg, 0.001)["max_iter"] == 1  # never 0
    engine.apply_schedule(cfg, 480)
    assert cfg.SOLVER.MAX_ITER == 480 and tuple(cfg.SOLVER.STEPS) == (120, 360)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--train-minutes"):
            engine.time_budget_schedule(cfg, bad)


def test_train_net_train_minutes_sets_max_iter(synthetic_root, tmp_path, monkeypatch):
    """train_net.py --train-minutes trains the planned number of iterations and records them in
    OUTPUT_DIR/config.yaml (the measured step time is fixed here: 0.6 s -> 6 s = 10 iterations)."""
    monkeypatch.setattr(engine, "measure_step_time", lambda cfg, **kw: 0.6)
    train_net = load_repo_module("train_net.py")
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file",
            str(TINY_CONFIG),
            "--train-minutes",
            "0.1",
            "MODEL.DEVICE",
            "cpu",
            *SYNTH,
            "INPUT.MIN_SIZE_TRAIN",
            "(160,)",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.CHECKPOINT_PERIOD",
            "1000",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    cfg = train_net.setup(args)
    assert cfg.SOLVER.MAX_ITER == 10
    assert "MAX_ITER: 10" in (tmp_path / "config.yaml").read_text()
    trainer = train_net.Trainer(cfg)
    trainer.train()
    assert trainer.iter == 10  # iterations 0..9 ran
    rows = [json.loads(r) for r in (tmp_path / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in rows) == 9
    assert (tmp_path / "model_final.pth").is_file()
