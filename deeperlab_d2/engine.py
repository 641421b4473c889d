"""The DeeperLab trainer: Detectron2's DefaultTrainer with the plugin's mapper, evaluators,
optimizer and LR schedule, and checkpoints that resume exactly.

Detectron2 0.6's ``DefaultTrainer`` saves only the iteration and the hooks' state (the LR
scheduler) in its checkpoints: after ``--resume`` the optimizer starts again with empty state
(no Adam moments, no SGD momentum) and with the learning rate of iteration 0 for one step.
:class:`Trainer` also saves and restores the optimizer (``"_trainer"``, the format of later
Detectron2 releases), and resumes through :class:`~deeperlab_d2.checkpoint.DeeperLabCheckpointer`
(never silently from iteration 0 when ``OUTPUT_DIR`` holds checkpoints).
"""

import logging
import weakref

from detectron2.engine import DefaultTrainer, hooks

from .checkpoint import DeeperLabCheckpointer
from .data import DeeperLabDatasetMapper, build_test_loader, build_train_loader
from .evaluation import build_evaluator
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DeeperLab mapper, evaluators, optimizer and poly LR schedule,
    whose checkpoints hold the optimizer state and whose resume never fails silently."""

    def __init__(self, cfg):
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
    def build_train_loader(cls, cfg):
        """Detectron2's loader with the DeeperLab mapper; dataset-loading errors name the file,
        mismatched annotations are skipped if DATALOADER.ON_ANNOTATION_MISMATCH is "skip"."""
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
