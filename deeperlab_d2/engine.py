"""The DeeperLab trainer: Detectron2's DefaultTrainer with the plugin's mapper, evaluators,
optimizer and LR schedule, and checkpoints that resume exactly.

Detectron2 0.6's ``DefaultTrainer`` saves only the iteration and the hooks' state (the LR
scheduler) in its checkpoints: after ``--resume`` the optimizer starts again with empty state
(no Adam moments, no SGD momentum) and with the learning rate of iteration 0 for one step.
:class:`Trainer` also saves and restores the optimizer (``"_trainer"``, the format of later
Detectron2 releases), and resumes through :class:`~deeperlab_d2.checkpoint.DeeperLabCheckpointer`
(never silently from iteration 0 when ``OUTPUT_DIR`` holds checkpoints).

Distributed training (one process per GPU, on one or several machines) also works for a CPU
model, in processes joined by a gloo process group (``tests/test_distributed.py``; Detectron2
0.6's ``launch`` itself needs CUDA): Detectron2 wraps the model with ``DistributedDataParallel``
passing ``device_ids=[local rank]``, which DDP refuses for a CPU module; see
:func:`create_ddp_model`. In several processes, :meth:`Trainer.test` evaluates the model that
rank 0 checkpoints: see :func:`broadcast_buffers`.
"""

import json
import logging
import os
import time
import weakref
from unittest import mock

import torch.distributed as dist
from detectron2.engine import DefaultTrainer, defaults, hooks
from detectron2.utils import comm

from .checkpoint import DeeperLabCheckpointer
from .data import DeeperLabDatasetMapper, build_test_loader, build_train_loader
from .evaluation import build_evaluator
from .solver import build_lr_scheduler, build_optimizer

__all__ = [
    "Trainer",
    "broadcast_buffers",
    "create_ddp_model",
    "apply_schedule",
    "measure_step_time",
    "time_budget_schedule",
    "training_step",
]

logger = logging.getLogger(__name__)

_d2_create_ddp_model = defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model`` (the model itself in a single process, else wrapped in
    ``DistributedDataParallel(model, **kwargs)``), which also wraps a CPU model: Detectron2
    0.6 passes ``device_ids=[comm.get_local_rank()]`` unless given, and DDP requires
    ``device_ids=None`` for a CPU module (the gloo backend, e.g. CPU processes in tests). CUDA
    models keep Detectron2's behaviour."""
    if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
        kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm running statistics) to every process; a no-op in a
    single process. Every process must call it (a collective).

    DDP averages the gradients, so the parameters stay the same in every process, but
    Detectron2 wraps the model with ``broadcast_buffers=False``: with ``BN`` (not ``SyncBN``)
    each process updates its running statistics from its own images (and PreciseBN recomputes
    them per process), so the processes hold different eval-mode models. Rank 0's is the one
    the checkpoints save."""
    if comm.get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DeeperLab mapper, evaluators, optimizer and poly LR schedule,
    whose checkpoints hold the optimizer state and whose resume never fails silently."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ calls detectron2.engine.defaults.create_ddp_model, which
        # cannot wrap a CPU model; ours can (for the duration of this call only)
        with mock.patch.object(defaults, "create_ddp_model", create_ddp_model):
            super().__init__(cfg)
        self.checkpointer = DeeperLabCheckpointer(
            self.checkpointer.model, self.checkpointer.save_dir, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:  # the periodic checkpointer was built with the old one
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    def resume_or_load(self, resume=True):
        """With ``resume``: the newest complete checkpoint of ``OUTPUT_DIR`` (model, iteration,
        optimizer, LR scheduler; see :meth:`DeeperLabCheckpointer.find_resume_checkpoint`), or
        ``MODEL.WEIGHTS`` (model only, iteration 0) when there is none."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if self.checkpointer.resumed_from:
            # the checkpoint stores the iteration that just finished
            self.start_iter = self.iter + 1
            logger.info(
                f"Resumed from {self.checkpointer.resumed_from} at iteration {self.start_iter}"
            )

    def state_dict(self):
        ret = super().state_dict()  # iteration, hooks (LR scheduler)
        ret["_trainer"] = self._trainer.state_dict()  # optimizer (and AMP grad scaler)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint holds no optimizer state (saved by an older version): the "
                "optimizer restarts with empty state (no momentum / Adam moments)"
            )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation (each process runs a share of the images, the evaluators
        gather), of rank 0's model in every process (:func:`broadcast_buffers`): so the
        evaluation during training in N processes gives the metrics of ``--eval-only`` of its
        checkpoint in one."""
        broadcast_buffers(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader with the DeeperLab mapper; dataset-loading errors name the file,
        mismatched annotations are skipped if DATALOADER.ON_ANNOTATION_MISMATCH is "skip".
        Detectron2's stock meta-architectures (configs/detectron2: instances and semantic PNGs
        as targets) get Detectron2's own loader and DatasetMapper."""
        if cfg.MODEL.META_ARCHITECTURE != "DeeperLab":
            return super().build_train_loader(cfg)
        return build_train_loader(cfg, DeeperLabDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def training_step(cfg):
    """One plain training step of ``cfg`` as :class:`Trainer` builds it (model, optimizer and
    training data loader; no hooks, no LR schedule), for benchmarks and profiles.

    Returns:
        a function running one step (next batch, losses, backward, optimizer step); its
        ``model`` and ``optimizer`` attributes are the two it updates.
    """
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    data = iter(Trainer.build_train_loader(cfg))

    def step():
        losses = model(next(data))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step.model, step.optimizer = model, optimizer
    return step


#: where :func:`time_budget_schedule` keeps the schedule it planned, in OUTPUT_DIR
SCHEDULE_FILE = "schedule.json"


def measure_step_time(cfg, steps: int = 12, warmup: int = 3) -> float:
    """Mean wall time (s) of one training step of ``cfg`` (:func:`training_step`: the model,
    optimizer and data loader the trainer builds, data loading included), over ``steps`` steps
    after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0:
        raise ValueError(
            f"measure_step_time: steps must be >= 1 and warmup >= 0, got {steps}, {warmup}"
        )
    step = training_step(cfg)
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def time_budget_schedule(cfg, minutes: float, resume: bool = False, **measure) -> dict:
    """A schedule that fits ``minutes`` of training on this machine, as it is loaded now: the
    step time of ``cfg`` is measured (:func:`measure_step_time`, ``measure`` its arguments)
    and the iterations that fit are planned. The plan is written to
    ``OUTPUT_DIR/schedule.json``; with ``resume`` an existing plan there is returned unchanged
    (a resumed run keeps the schedule it started with). Apply it with
    :func:`apply_schedule`.

    Returns:
        ``{"max_iter", "seconds_per_iter", "minutes", "config_max_iter"}``.

    Raises:
        ValueError: ``minutes`` <= 0, or several processes (each would measure its own).
    """
    if not minutes > 0:
        raise ValueError(f"--train-minutes must be > 0, got {minutes}")
    if comm.get_world_size() > 1:
        raise ValueError("--train-minutes plans the schedule of a single process only")
    path = os.path.join(cfg.OUTPUT_DIR, SCHEDULE_FILE)
    if resume and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    seconds = measure_step_time(cfg, **measure)
    plan = {
        "max_iter": max(1, int(minutes * 60 / seconds)),
        "seconds_per_iter": seconds,
        "minutes": minutes,
        "config_max_iter": cfg.SOLVER.MAX_ITER,
    }
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=1)
    return plan


def apply_schedule(cfg, max_iter: int) -> None:
    """Set ``SOLVER.MAX_ITER`` of an unfrozen ``cfg`` to ``max_iter``, with the LR decay
    steps (``SOLVER.STEPS``, multi-step schedules) scaled in proportion."""
    ratio = max_iter / cfg.SOLVER.MAX_ITER
    cfg.SOLVER.STEPS = tuple(int(round(s * ratio)) for s in cfg.SOLVER.STEPS)
    cfg.SOLVER.MAX_ITER = int(max_iter)
