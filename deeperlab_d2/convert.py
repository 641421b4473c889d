"""Convert ImageNet-pretrained classification weights into backbone checkpoints for
``MODEL.WEIGHTS``.

Usage::

    python -m deeperlab_d2.convert mobilenet_v2 --source mobilenet_v2_imagenet.pth \\
        --output wmnv2_imagenet.pth [--width-mult 1.0] [--kernel-size 5|3] [--norm BN]

The options default to the ``MODEL.MOBILENETV2`` defaults (W-MNV2: width 1.0, 5x5 depthwise
kernels, BN); pass the values of the config you train.

Each source network is a subcommand (only ``mobilenet_v2`` for now: torchvision's
``mobilenet_v2``; Xception-71 from timm is not converted yet). The output is a Detectron2
checkpoint ``{"model": state_dict, "__author__": ...}`` whose keys carry the ``backbone.`` prefix
of the meta-architectures' state_dicts, so ``DetectionCheckpointer`` loads it into the backbone of
a DeeperLab (or Panoptic-DeepLab) model; the heads stay randomly initialised.

Every conversion reports the source tensors it did not use (for MobileNetV2: the final 1x1 conv
to 1280 channels and the classifier, which the backbone drops) and the target tensors it did not
fill; a missing source tensor or one of another shape is an error naming the tensor.

MobileNetV2 -> W-MNV2: the plugin's W-MNV2 (``MODEL.MOBILENETV2.KERNEL_SIZE 5``) differs from
MobileNetV2 only by its 5x5 depthwise kernels (channel counts are the same for the same
``WIDTH_MULT``). ``--kernel-size 5`` zero-pads every 3x3 depthwise kernel to 5x5 (centered): the
backbone pads a depthwise conv by ``dilation * (kernel_size - 1) // 2`` on each side, i.e. by
``dilation`` more per side for 5x5 than for 3x3, so at every stride and dilation the 5x5 kernel
reads the same inputs with the same weights (the added taps see zero weights) and the network
computes exactly the ImageNet MobileNetV2 features.
"""

import argparse
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .modeling.backbone.mobilenet_v2 import MobileNetV2

__all__ = [
    "BN_NORMS",
    "Conversion",
    "ConversionError",
    "convert_mobilenet_v2",
    "convert_file",
    "load_source_state_dict",
    "main",
    "mobilenet_v2_key_map",
    "save_checkpoint",
]

# norms whose parameters/buffers are BatchNorm's (weight, bias, running_mean, running_var and,
# except FrozenBN, num_batches_tracked): ImageNet BatchNorm statistics only make sense there
BN_NORMS = ("BN", "SyncBN", "naiveSyncBN", "FrozenBN")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_OPTIONAL_SOURCE = ("num_batches_tracked",)  # absent from old checkpoints; not needed
_LIST_AT_MOST = 20

SourceLike = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class ConversionError(ValueError):
    """The source weights do not fit the target backbone (missing tensors, other shapes), or
    cannot be read."""


@dataclass
class Conversion:
    """The result of a conversion.

    Attributes:
        state_dict: target state_dict (keys with ``prefix``, e.g. ``backbone.stem.weight``).
        unused_source: source keys that were not used, in source order.
        unfilled_target: target keys (with ``prefix``) that no source tensor filled; they keep
            the model's own initialisation when loaded (not in ``state_dict``).
        zero_padded: target keys of depthwise kernels zero-padded to a larger kernel.
        source: where the source came from (a path, or "state_dict").
    """

    state_dict: "OrderedDict[str, torch.Tensor]"
    unused_source: List[str] = field(default_factory=list)
    unfilled_target: List[str] = field(default_factory=list)
    zero_padded: List[str] = field(default_factory=list)
    source: str = "state_dict"

    def format_report(self) -> str:
        """A human-readable report listing every unused source and unfilled target tensor."""
        lines = [
            f"converted {len(self.state_dict)} tensors from {self.source}"
            + (
                f" ({len(self.zero_padded)} depthwise kernels zero-padded)"
                if self.zero_padded
                else ""
            )
        ]
        lines.append(f"source tensors not used: {len(self.unused_source)}")
        lines += [f"  {k}" for k in self.unused_source]
        lines.append(f"target tensors not filled: {len(self.unfilled_target)}")
        lines += [f"  {k}" for k in self.unfilled_target]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# reading and writing
# ------------------------------------------------------------------------------------------


def load_source_state_dict(source: SourceLike) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a classification checkpoint.

    Args:
        source: a state_dict, or the path of a file holding one (``torch.save(model.state_dict())``,
            e.g. torchvision's downloaded weights) or a training checkpoint with the state_dict
            under ``"model"`` or ``"state_dict"`` (torchvision's reference scripts). A
            ``module.`` prefix (DataParallel) is removed.

    Raises:
        ConversionError: the file cannot be read as tensors only, or holds no state_dict.
    """
    name = "the source"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise ConversionError(f"source weights {name} do not exist")
        try:
            loaded = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors, truncated files ...
            raise ConversionError(
                f"cannot read source weights {name} (loaded with weights_only=True): "
                f"{type(e).__name__}: {e}. If it is a training checkpoint holding other Python "
                "objects, save its state_dict alone, e.g. "
                "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')"
            ) from e
    else:
        loaded = source
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ConversionError(f"{name} holds no state_dict (a dict of tensors)")
    state_dict = OrderedDict()
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{name}: {key!r} is a {type(value).__name__}, not a tensor: not a state_dict"
            )
        key = key[len("module.") :] if key.startswith("module.") else key
        state_dict[key] = value
    return state_dict


def save_checkpoint(conversion: Conversion, output: Union[str, os.PathLike]) -> None:
    """Write ``conversion.state_dict`` as a Detectron2 checkpoint (``{"model": ...}``) that
    ``MODEL.WEIGHTS`` / ``DetectionCheckpointer.load`` reads; written to a temporary file first,
    so an interrupted run leaves no truncated checkpoint."""
    output = os.fspath(output)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    tmp = output + ".tmp"
    torch.save(
        {
            "model": conversion.state_dict,
            "__author__": f"deeperlab_d2.convert ({conversion.source})",
        },
        tmp,
    )
    os.replace(tmp, output)


# ------------------------------------------------------------------------------------------
# the generic tensor mapping
# ------------------------------------------------------------------------------------------


def _fit_tensor(
    source_key: str,
    source: torch.Tensor,
    target_key: str,
    target: torch.Tensor,
    pad_spatial: bool,
) -> Tuple[Optional[torch.Tensor], Optional[str], bool]:
    """(converted tensor, problem, zero-padded) for one source -> target tensor.

    A depthwise kernel (``pad_spatial``) smaller than the target's is zero-padded around its
    center; any other shape difference is a problem naming both tensors and shapes.
    """
    mismatch = (
        f"{source_key} has shape {tuple(source.shape)} in the source but its target "
        f"{target_key} has shape {tuple(target.shape)}"
    )
    padded = False
    if source.shape != target.shape:
        ok = (
            pad_spatial
            and source.dim() == 4
            and source.shape[:2] == target.shape[:2]
            and all(t >= s and (t - s) % 2 == 0 for s, t in zip(source.shape[2:], target.shape[2:]))
        )
        if not ok:
            return None, mismatch, False
        dh = (target.shape[2] - source.shape[2]) // 2
        dw = (target.shape[3] - source.shape[3]) // 2
        source = F.pad(source, (dw, dw, dh, dh))
        padded = True
    if source.is_floating_point() and target.is_floating_point():
        source = source.to(target.dtype)
    return source.detach().clone().contiguous(), None, padded


def _convert(
    source: "OrderedDict[str, torch.Tensor]",
    target: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    pad_spatial: Sequence[str],
    prefix: str,
    source_name: str,
    hint: str,
) -> Conversion:
    """Fill ``target`` (a state_dict giving the keys and shapes) from ``source`` through
    ``key_map`` (target key -> source key).

    Raises:
        ConversionError: listing every missing source tensor and every shape mismatch.
    """
    pad_spatial = set(pad_spatial)
    converted: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    used, unfilled, padded, problems = set(), [], [], []
    for target_key, target_tensor in target.items():
        source_key = key_map.get(target_key)
        if source_key is None or source_key not in source:
            if source_key is not None and not source_key.endswith(_OPTIONAL_SOURCE):
                problems.append(
                    f"{source_key} (for {prefix}{target_key}, shape "
                    f"{tuple(target_tensor.shape)}) is missing from the source"
                )
            unfilled.append(prefix + target_key)
            continue
        used.add(source_key)
        tensor, problem, was_padded = _fit_tensor(
            source_key,
            source[source_key],
            prefix + target_key,
            target_tensor,
            target_key in pad_spatial,
        )
        if problem:
            problems.append(problem)
            continue
        converted[prefix + target_key] = tensor
        if was_padded:
            padded.append(prefix + target_key)
    if problems:
        shown = problems[:_LIST_AT_MOST]
        if len(problems) > len(shown):
            shown.append(f"... ({len(problems) - len(shown)} more)")
        if not used:
            hint = f"none of the expected tensors is in {source_name}: {hint}"
        raise ConversionError(
            f"{source_name} does not fit the target backbone ({len(problems)} problems):\n  "
            + "\n  ".join(shown)
            + f"\n{hint}"
        )
    return Conversion(
        state_dict=converted,
        unused_source=[k for k in source if k not in used],
        unfilled_target=unfilled,
        zero_padded=padded,
        source=source_name,
    )


# ------------------------------------------------------------------------------------------
# torchvision mobilenet_v2 -> deeperlab_d2 MobileNetV2 / W-MNV2
# ------------------------------------------------------------------------------------------


def mobilenet_v2_key_map() -> Tuple[Dict[str, str], List[str]]:
    """Map the keys of :class:`~deeperlab_d2.modeling.backbone.MobileNetV2` (unprefixed) to
    those of torchvision's ``mobilenet_v2``.

    torchvision's ``features.0`` is the stem (``.0`` conv, ``.1`` BN); ``features.1`` ..
    ``features.17`` are the 17 inverted residual blocks, in the order of our stages
    ``stage1.0``, ``stage2.0``, ``stage2.1``, ... ``stage7.0``; ``features.18`` (1x1 conv to
    1280) and ``classifier`` have no counterpart. A block's ``conv`` is ``[dw, project, BN]``
    when its expansion ratio is 1, else ``[expand, dw, project, BN]``, with the dw and expand
    layers as ``(conv, BN, ReLU6)`` sequences; ours is a sequence of Detectron2 ``Conv2d``
    with ``.norm``.

    Returns:
        (target key -> source key, the target keys of depthwise kernels).
    """
    # (target layer, source conv, source BN, depthwise)
    layers = [("stem", "features.0.0", "features.0.1", False)]
    block = 1
    for stage, (t, _c, n, _s, _feature) in enumerate(MobileNetV2.STAGES, start=1):
        for i in range(n):
            tgt, src = f"stage{stage}.{i}.conv", f"features.{block}.conv"
            if t == 1:
                layers += [
                    (f"{tgt}.0", f"{src}.0.0", f"{src}.0.1", True),
                    (f"{tgt}.1", f"{src}.1", f"{src}.2", False),
                ]
            else:
                layers += [
                    (f"{tgt}.0", f"{src}.0.0", f"{src}.0.1", False),
                    (f"{tgt}.1", f"{src}.1.0", f"{src}.1.1", True),
                    (f"{tgt}.2", f"{src}.2", f"{src}.3", False),
                ]
            block += 1
    key_map, depthwise = {}, []
    for tgt, src_conv, src_bn, is_depthwise in layers:
        key_map[f"{tgt}.weight"] = f"{src_conv}.weight"
        if is_depthwise:
            depthwise.append(f"{tgt}.weight")
        for name in _BN_TENSORS:
            key_map[f"{tgt}.norm.{name}"] = f"{src_bn}.{name}"
    return key_map, depthwise


def convert_mobilenet_v2(
    source: SourceLike,
    width_mult: float = 1.0,
    kernel_size: int = 5,
    norm: str = "BN",
    prefix: str = "backbone.",
) -> Conversion:
    """Map torchvision ``mobilenet_v2`` weights onto the plugin's MobileNetV2 backbone.

    Args:
        source: torchvision state_dict or its file (see :func:`load_source_state_dict`).
        width_mult: ``MODEL.MOBILENETV2.WIDTH_MULT`` of the target; the source must have been
            built with the same ``width_mult`` (torchvision's ImageNet weights: 1.0).
        kernel_size: ``MODEL.MOBILENETV2.KERNEL_SIZE`` of the target (odd, >= 3); 5 (W-MNV2,
            the config default) zero-pads the 3x3 depthwise kernels, which computes the same
            features; 3 copies them.
        norm: ``MODEL.MOBILENETV2.NORM`` of the target, a BatchNorm variant (see
            :data:`BN_NORMS`); it only decides whether ``num_batches_tracked`` is kept
            (FrozenBN has none).
        prefix: prepended to the backbone keys (``backbone.`` for the meta-architectures).

    Returns:
        a :class:`Conversion`; its report lists ``features.18.*`` and ``classifier.*`` as
        unused (our backbone drops the 1280-channel conv and the classifier).

    Raises:
        ConversionError: a tensor missing from the source or of another shape (e.g. another
            width multiplier), naming the tensor and both shapes.
        ValueError: bad ``width_mult``, ``kernel_size`` or ``norm``.
    """
    if norm not in BN_NORMS:
        raise ValueError(
            f"norm must be one of {BN_NORMS} (ImageNet BatchNorm statistics), got {norm!r}"
        )
    source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    source_state = load_source_state_dict(source)
    # strides and dilations do not change any shape: output stride 32 builds every stage
    target = MobileNetV2(
        output_stride=32, norm=norm, width_mult=width_mult, kernel_size=kernel_size
    ).state_dict()
    key_map, depthwise = mobilenet_v2_key_map()
    return _convert(
        source_state,
        target,
        key_map,
        depthwise,
        prefix,
        source_name,
        hint=(
            "The source must be torchvision's mobilenet_v2 state_dict "
            "(torchvision.models.mobilenet_v2(...).state_dict()) built with the same "
            f"width_mult as the target (--width-mult {width_mult}); the target backbone "
            f"is MobileNetV2(width_mult={width_mult}, kernel_size={kernel_size})."
        ),
    )


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def convert_file(
    converter: Callable[..., Conversion],
    source: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    verbose: bool = True,
    **options,
) -> Conversion:
    """``converter(source, **options)``, written to ``output``; prints the report."""
    conversion = converter(source, **options)
    save_checkpoint(conversion, output)
    if verbose:
        print(conversion.format_report())
        print(f"wrote {output}: set MODEL.WEIGHTS {output}")
    return conversion


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="source weights file (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")


def _run_mobilenet_v2(args) -> Conversion:
    return convert_file(
        convert_mobilenet_v2,
        args.source,
        args.output,
        width_mult=args.width_mult,
        kernel_size=args.kernel_size,
        norm=args.norm,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one subcommand per source network."""
    parser = argparse.ArgumentParser(
        prog="python -m deeperlab_d2.convert",
        description="Convert ImageNet classification weights into a backbone checkpoint "
        "for MODEL.WEIGHTS (keys prefixed 'backbone.').",
    )
    sub = parser.add_subparsers(dest="network", required=True, metavar="NETWORK")
    mnv2 = sub.add_parser(
        "mobilenet_v2",
        help="torchvision mobilenet_v2 -> MobileNetV2 / W-MNV2 (build_mobilenetv2_backbone)",
        description="torchvision mobilenet_v2 state_dict -> build_mobilenetv2_backbone. "
        "Use the MODEL.MOBILENETV2 values of the config you train.",
    )
    _add_io_arguments(mnv2)
    mnv2.add_argument(
        "--width-mult",
        type=float,
        default=1.0,
        help="MODEL.MOBILENETV2.WIDTH_MULT; must be the source's width (default 1.0, as the "
        "config and torchvision's ImageNet weights)",
    )
    mnv2.add_argument(
        "--kernel-size",
        type=int,
        default=5,
        help="MODEL.MOBILENETV2.KERNEL_SIZE: 5 (W-MNV2: the 3x3 depthwise kernels are "
        "zero-padded, same features) or 3 (MobileNetV2) (default 5, as the config)",
    )
    mnv2.add_argument(
        "--norm",
        default="BN",
        choices=BN_NORMS,
        help="MODEL.MOBILENETV2.NORM (FrozenBN drops num_batches_tracked) (default BN, as the "
        "config)",
    )
    mnv2.set_defaults(run=_run_mobilenet_v2)
    # xception71 (timm) goes here as another subcommand
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    """Command-line entry point; returns the :class:`Conversion`."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
