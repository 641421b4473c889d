"""Optimizer and LR schedule choices of the DeeperLab configs (SOLVER.OPTIMIZER, WarmupPolyLR)."""

import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ParamScheduler


class PolyParamScheduler(ParamScheduler):
    """Multiplier ``end + (1 - end) * (1 - where) ** power`` for ``where`` in [0, 1]."""

    def __init__(self, power: float, end: float = 0.0):
        self.power, self.end = power, end

    def __call__(self, where: float) -> float:
        return self.end + (1.0 - self.end) * (1.0 - min(max(where, 0.0), 1.0)) ** self.power


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov from SOLVER.*), Adam or AdamW by SOLVER.OPTIMIZER, with weight
    decay SOLVER.WEIGHT_DECAY (WEIGHT_DECAY_NORM for norm layers, WEIGHT_DECAY_BIAS for biases)
    in every parameter group: never the optimizer's own default (AdamW's is 0.01)."""
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        opt = torch.optim.SGD(
            params,
            cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    elif name == "ADAM":
        opt = torch.optim.Adam(params, cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    elif name == "ADAMW":
        opt = torch.optim.AdamW(params, cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    else:
        raise ValueError(f"config key SOLVER.OPTIMIZER must be SGD, ADAM or ADAMW, got {name!r}")
    return maybe_add_gradient_clipping(cfg, opt)


def build_lr_scheduler(cfg, optimizer):
    """ "WarmupPolyLR" here; any other SOLVER.LR_SCHEDULER_NAME goes to Detectron2's builder."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    end = cfg.SOLVER.POLY_LR_END / cfg.SOLVER.BASE_LR if cfg.SOLVER.BASE_LR > 0 else 0.0
    sched = WarmupParamScheduler(
        PolyParamScheduler(cfg.SOLVER.POLY_LR_POWER, end),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / max(cfg.SOLVER.MAX_ITER, 1), 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
