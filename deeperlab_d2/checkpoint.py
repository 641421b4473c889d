"""Checkpoint loading that never fails silently.

Detectron2's checkpointer only logs a warning when a checkpoint does not fit the model (missing
keys, shape mismatches: those parts stay randomly initialised), loads nothing for an empty
``MODEL.WEIGHTS``, and on ``--resume`` silently starts again from iteration 0 when the
``last_checkpoint`` file of ``OUTPUT_DIR`` is missing, although ``model_*.pth`` files are there.

* :func:`load_model_weights`: weights for inference (``train_net.py --eval-only``,
  ``demo.py``); raises an error naming the file and the keys unless random weights are
  explicitly allowed.
* :class:`DeeperLabCheckpointer`: the training checkpointer; on resume it picks the newest
  complete checkpoint and says why when ``last_checkpoint`` is missing, empty or names a
  missing or unreadable file.

Both raise a :class:`FileNotFoundError` that names the command creating the file when
``MODEL.WEIGHTS`` is a missing file of the converted ImageNet weights (a path with a
``weights/`` folder, e.g. the configs' ``weights/xception71_imagenet.pth``, see
:func:`converted_weights_command`) instead of Detectron2's bare "Checkpoint ... not found!".
"""

import logging
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CONVERTED_WEIGHTS_DIR",
    "CheckpointError",
    "DeeperLabCheckpointer",
    "converted_weights_command",
    "load_model_weights",
    "missing_weights_message",
]

logger = logging.getLogger(__name__)

# the files detectron2's PeriodicCheckpointer writes: model_0004999.pth ... model_final.pth
_TRAINING_CHECKPOINT = re.compile(r"^model_(\d+|final)\.pth$")
_LIST_AT_MOST = 10
#: the folder of the converted ImageNet weights (``python -m deeperlab_d2.convert``) in the
#: configs' ``MODEL.WEIGHTS`` (relative to the working directory)
CONVERTED_WEIGHTS_DIR = "weights"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, does not fit the model, or cannot be resumed from."""


def converted_weights_command(path: str) -> Optional[str]:
    """The ``python -m deeperlab_d2.convert`` command that writes ``path``, when ``path`` follows
    the converted-weights convention (a local file inside a :data:`CONVERTED_WEIGHTS_DIR`
    folder); ``None`` otherwise. The network is guessed from the file name (``xception`` /
    ``x71``: timm's xception71; ``mnv2`` / ``mobilenet``: torchvision's mobilenet_v2; ``fpn``
    adds the FPN models' ``--prefix``); other names get both choices."""
    if not path or "://" in path:
        return None
    parts = os.path.normpath(path).split(os.sep)
    if CONVERTED_WEIGHTS_DIR not in parts[:-1]:
        return None
    name = parts[-1].lower()
    if "xception" in name or "x71" in name:
        command = "python -m deeperlab_d2.convert xception71 --source timm"
    elif "mnv2" in name or "mobilenet" in name:
        # the source: torchvision's ImageNet mobilenet_v2 state_dict, saved to a file
        command = "python -m deeperlab_d2.convert mobilenet_v2 --source mobilenet_v2_imagenet.pth"
    else:
        command = "python -m deeperlab_d2.convert {xception71,mobilenet_v2} --source ..."
    command += f" --output {path}"
    if "fpn" in name:
        command += " --prefix backbone.bottom_up."
    return command


def missing_weights_message(path: str) -> Optional[str]:
    """The error message for a missing converted-weights file ``path`` (see
    :func:`converted_weights_command`); ``None`` when ``path`` exists or is not one."""
    command = converted_weights_command(path)
    if command is None or os.path.isfile(path):
        return None
    where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
    return (
        f"MODEL.WEIGHTS: {path} does not exist{where}. It holds converted ImageNet weights of "
        f"the backbone; create it with\n  {command}\n"
        "(python -m deeperlab_d2.convert --help; docs/training.md, ImageNet weights), or set "
        'MODEL.WEIGHTS to another checkpoint ("" trains from scratch).'
    )


def _key_list(keys: List[str]) -> str:
    shown = ", ".join(keys[:_LIST_AT_MOST])
    return shown + (
        f", ... ({len(keys) - _LIST_AT_MOST} more)" if len(keys) > _LIST_AT_MOST else ""
    )


def incompatibility_message(incompatible) -> Tuple[str, str]:
    """(problems that leave parts of the model uninitialised, extra checkpoint keys) as text;
    empty strings when there are none. Missing ``num_batches_tracked`` counters are ignored
    (unused: BatchNorm here has a momentum), as are non-persistent buffers (pixel_mean/std),
    which are never saved and come from the config."""
    # a key with another shape is also reported missing (Detectron2 drops it before loading)
    wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = [
        k
        for k in incompatible.missing_keys
        if k not in wrong_shape and not k.endswith("num_batches_tracked")
    ]
    problems = []
    if incompatible.incorrect_shapes:
        shapes = [
            f"{k} ({tuple(ckpt)} in the checkpoint, {tuple(model)} in the model)"
            for k, ckpt, model in incompatible.incorrect_shapes
        ]
        problems.append(
            f"{len(shapes)} parameters/buffers with a different shape: {_key_list(shapes)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} parameters/buffers missing from the checkpoint: {_key_list(missing)}"
        )
    unexpected = list(incompatible.unexpected_keys)
    extra = f"{len(unexpected)}: {_key_list(unexpected)}" if unexpected else ""
    return "; ".join(problems), extra


class DeeperLabCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose loading errors name the file, and whose resume picks the
    newest complete checkpoint of ``save_dir`` (see :meth:`find_resume_checkpoint`).

    After :meth:`resume_or_load`, ``resumed_from`` is the checkpoint resumed from (``None``
    when it loaded ``path`` instead); after any load, ``incompatible`` holds the keys that did
    not fit (Detectron2's ``_IncompatibleKeys``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed_from: Optional[str] = None
        self.incompatible = None
        self._preloaded: Optional[Tuple[str, Dict[str, Any]]] = None

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """Detectron2's ``load``; a missing converted-weights file (see
        :func:`converted_weights_command`) raises :class:`FileNotFoundError` naming the command
        that creates it (with DDP only on the main worker, which Detectron2 requires to have
        the file; the others may lack it)."""
        if not isinstance(self.model, DistributedDataParallel) or comm.is_main_process():
            message = missing_weights_message(path)
            if message:
                raise FileNotFoundError(message)
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if self._preloaded is not None and self._preloaded[0] == filename:
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        try:
            return super()._load_file(filename)
        except Exception as e:
            if filename.endswith(".pth") and not zipfile.is_zipfile(filename):
                # torch's own message for a damaged file can mislead (with weights_only:
                # "re-running with weights_only=False will likely succeed")
                reason = (
                    "it is not a complete PyTorch zip archive: a truncated or corrupt file "
                    f"(e.g. from a job killed while saving?) ({type(e).__name__})"
                )
            else:
                reason = f"{type(e).__name__}: {e}"
            raise CheckpointError(f"cannot read checkpoint {filename}: {reason}") from e

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def training_checkpoints(self) -> List[str]:
        """The ``model_*.pth`` files of ``save_dir``, newest first (``model_final.pth``, then by
        decreasing iteration)."""
        if not self.save_dir or not self.path_manager.isdir(self.save_dir):
            return []
        found = []
        for name in self.path_manager.ls(self.save_dir):
            m = _TRAINING_CHECKPOINT.match(name)
            if m and self.path_manager.isfile(os.path.join(self.save_dir, name)):
                order = float("inf") if m.group(1) == "final" else int(m.group(1))
                found.append((order, os.path.join(self.save_dir, name)))
        return [path for _, path in sorted(found, reverse=True)]

    def find_resume_checkpoint(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The checkpoint to resume from and its loaded content, or ``None`` when ``save_dir``
        holds neither a ``last_checkpoint`` file nor a ``model_*.pth`` (a new training).

        The file named by ``last_checkpoint`` when it loads. Otherwise (``last_checkpoint``
        missing, empty, naming a missing file, or that file unreadable or holding no training
        state) the newest ``model_*.pth`` that loads, with a warning that names what was wrong.

        Raises:
            CheckpointError: when there are checkpoints but none of them can be resumed from.
        """
        tag = os.path.join(self.save_dir, "last_checkpoint")
        problems, candidates = [], []
        if self.path_manager.exists(tag):
            with self.path_manager.open(tag, "r") as f:
                name = f.read().strip()
            if not name:
                problems.append(f"{tag} is empty")
            elif not self.path_manager.isfile(os.path.join(self.save_dir, name)):
                problems.append(f"{tag} names {name!r}, which does not exist")
            else:
                candidates.append(os.path.join(self.save_dir, name))
        else:
            problems.append(f"{tag} does not exist")
        candidates += [p for p in self.training_checkpoints() if p not in candidates]
        if not candidates and not self.path_manager.exists(tag):
            return None
        for path in candidates:
            try:
                checkpoint = self._load_file(path)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if not isinstance(checkpoint, dict) or "trainer" not in checkpoint:
                problems.append(f"{path} holds no training state (iteration, optimizer)")
                continue
            if problems:
                logger.warning(
                    f"--resume: resuming from {path}, the newest complete checkpoint in "
                    f"{self.save_dir}, because " + "; ".join(problems)
                )
            return path, checkpoint
        raise CheckpointError(
            f"--resume: no checkpoint in {self.save_dir} can be resumed from: "
            + "; ".join(problems)
            + ". Remove the broken files to resume from an older checkpoint, or to train from "
            "scratch use a new OUTPUT_DIR (or run without --resume)."
        )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume``: the checkpoint of :meth:`find_resume_checkpoint` with every
        checkpointable (trainer: iteration, optimizer, LR scheduler); it must fit the model.
        Otherwise, or when ``save_dir`` holds no checkpoint: only the model weights of ``path``
        (e.g. ImageNet weights of the backbone; missing keys are logged by Detectron2)."""
        self.resumed_from = None
        found = self.find_resume_checkpoint() if resume else None
        if found is None:
            if resume:
                logger.info(f"--resume: no checkpoint in {self.save_dir}, starting a new training")
            return self.load(path, checkpointables=[])
        self.resumed_from, self._preloaded = found[0], found
        # the model first, checked, before the trainer state
        extra = self.load(self.resumed_from, checkpointables=[])
        problems, _ = incompatibility_message(self.incompatible)
        if problems:
            raise CheckpointError(
                f"--resume: checkpoint {self.resumed_from} does not fit the model ({problems}). "
                "Was the config (e.g. MODEL.DEEPERLAB.NUM_CLASSES, the backbone) changed since "
                "it was saved?"
            )
        for key, obj in self.checkpointables.items():
            if key in extra:
                self.logger.info(f"Loading {key} from {self.resumed_from} ...")
                try:
                    obj.load_state_dict(extra.pop(key))
                except ValueError as e:
                    raise CheckpointError(
                        f"--resume: the {key} state in {self.resumed_from} does not fit this "
                        f"run ({e}). The solver config differs from the run that saved it "
                        "(SOLVER.OPTIMIZER, SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM, "
                        "WEIGHT_DECAY_BIAS and BIAS_LR_FACTOR decide the parameter groups), or "
                        "the checkpoint predates deeperlab_d2 applying SOLVER.WEIGHT_DECAY. "
                        "Resume with the config it was saved with, or start a new OUTPUT_DIR "
                        f"from its weights: MODEL.WEIGHTS {self.resumed_from}, without --resume."
                    ) from e
        return extra


def load_model_weights(model: torch.nn.Module, weights: str, *, allow_random: bool = False):
    """Load the model weights of checkpoint ``weights`` for inference; every parameter and
    persistent buffer of ``model`` must be in it with the same shape.

    Checkpoints written by training (with trainer / optimizer / scheduler state besides the
    model) load as well. Non-persistent buffers (pixel_mean/std, from the config) are never in
    a checkpoint and are not required.

    Args:
        weights: path or URL of the checkpoint (``MODEL.WEIGHTS``).
        allow_random: accept an empty ``weights`` (the model stays randomly initialised) and a
            checkpoint that does not fit (those parameters stay random), with a warning.

    Raises:
        ValueError: ``weights`` is empty and ``allow_random`` is not set.
        FileNotFoundError: the file does not exist.
        CheckpointError: the file cannot be read, or does not fit the model.
    """
    if not weights:
        if allow_random:
            logger.warning(
                "MODEL.WEIGHTS is empty: the model keeps its random initialisation "
                "(--allow-random-weights)"
            )
            return
        raise ValueError(
            "MODEL.WEIGHTS is empty: nothing to evaluate. Pass the checkpoint of a trained "
            "model (MODEL.WEIGHTS output/.../model_final.pth), or --allow-random-weights to run "
            "an untrained model on purpose."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            missing_weights_message(weights)
            or f"MODEL.WEIGHTS: checkpoint {weights} does not exist"
        )
    checkpointer = DeeperLabCheckpointer(model)
    checkpointer.load(weights, checkpointables=[])
    problems, extra = incompatibility_message(checkpointer.incompatible)
    if extra:
        logger.warning(f"checkpoint {weights}: keys that the model does not use: {extra}")
    if problems:
        message = (
            f"checkpoint {weights} does not fit the model: {problems}. Was it trained with "
            "another config (e.g. MODEL.DEEPERLAB.NUM_CLASSES, the backbone or head widths)?"
        )
        if not allow_random:
            raise CheckpointError(
                message + " Pass --allow-random-weights to run with those parameters random."
            )
        logger.warning(message + " Those parameters stay random (--allow-random-weights).")
