"""The optimizer builder applies the config's weight decay to every parameter group."""

import pytest
import torch
from detectron2.config import get_cfg

from deeperlab_d2.config import add_deeperlab_config
from deeperlab_d2.solver import build_optimizer


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
    )


def _groups(opt, model):
    """weight decay of each named parameter, from the optimizer's groups"""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", ["SGD", "ADAM", "ADAMW"])
def test_weight_decay_reaches_every_group(name):
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.SOLVER.OPTIMIZER = name
    cfg.SOLVER.WEIGHT_DECAY = 3e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None
    model = _model()
    decay = _groups(build_optimizer(cfg, model), model)
    assert decay == {
        "0.weight": 3e-4,
        "0.bias": 3e-4,
        "1.weight": 0.0,  # norm layer: WEIGHT_DECAY_NORM
        "1.bias": 0.0,
        "2.weight": 3e-4,
        "2.bias": 3e-4,
    }


def test_zero_weight_decay_is_zero_for_adamw():
    # AdamW's own default (0.01) must not leak in when the config says 0
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    model = _model()
    assert set(_groups(build_optimizer(cfg, model), model).values()) == {0.0}
