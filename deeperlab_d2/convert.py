"""Convert ImageNet-pretrained classification weights into backbone checkpoints for
``MODEL.WEIGHTS``.

Usage::

    python -m deeperlab_d2.convert mobilenet_v2 --source mobilenet_v2_imagenet.pth \\
        --output weights/wmnv2_imagenet.pth [--width-mult 1.0] [--kernel-size 5|3] [--norm BN]
    python -m deeperlab_d2.convert xception71 --source xception71_timm.pth|.safetensors|timm \\
        --output weights/xception71_imagenet.pth [--norm BN] [--source-bn-eps 0.001] \\
        [--layout tf_deeplab|paper]

Both take ``--prefix`` (default ``backbone.``, see below).

The options default to the ``MODEL.MOBILENETV2`` / ``MODEL.XCEPTION`` defaults (W-MNV2: width
1.0, 5x5 depthwise kernels, BN; Xception-71: BN), except ``--layout`` (``tf_deeplab``, the
layout of the ImageNet weights, see below); pass the values of the config you train. Every
report ends with the config values the checkpoint must be used with (``MODEL.XCEPTION.LAYOUT``,
``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``, ``INPUT.FORMAT``, ...).

Each source network is a subcommand: ``mobilenet_v2`` (torchvision's ``mobilenet_v2``) and
``xception71`` (timm's ``xception71``, the aligned Xception-71 of TF DeepLab). The output is a
Detectron2 checkpoint ``{"model": state_dict, "__author__": ...}`` whose keys carry the
``backbone.`` prefix of the meta-architectures' state_dicts, so ``DetectionCheckpointer`` loads
it into the backbone of a DeeperLab (or Panoptic-DeepLab) model; the heads stay randomly
initialised.

Every conversion reports the source tensors it did not use (for MobileNetV2: the final 1x1 conv
to 1280 channels and the classifier, which the backbone drops; for Xception-71: the classifier
``head.fc``) and the target tensors it did not fill; a missing source tensor or one of another
shape is an error naming the tensor.

MobileNetV2 -> W-MNV2: the plugin's W-MNV2 (``MODEL.MOBILENETV2.KERNEL_SIZE 5``) differs from
MobileNetV2 only by its 5x5 depthwise kernels (channel counts are the same for the same
``WIDTH_MULT``). ``--kernel-size 5`` zero-pads every 3x3 depthwise kernel to 5x5 (centered): the
backbone pads a depthwise conv by ``dilation * (kernel_size - 1) // 2`` on each side, i.e. by
``dilation`` more per side for 5x5 than for 3x3, so at every stride and dilation the 5x5 kernel
reads the same inputs with the same weights (the added taps see zero weights) and the network
computes exactly the ImageNet MobileNetV2 features.

timm xception71 -> Xception-71: timm's ``xception71`` is TF DeepLab's ``xception_71`` (its
``tf_in1k`` weights are DeepLab's ImageNet checkpoint). Every tensor maps one to one, by
structure: timm's ``stem.{0,1}`` (conv + BN + ReLU) are our ``stem.{0,1}``; ``blocks.0`` ..
``blocks.22`` are our ``entry_flow1..5``, ``middle_flow1..16``, ``exit_flow1..2`` (checked
against :data:`TIMM_XCEPTION71_BLOCKS`: channels, stride and shortcut of every block); a
block's ``stack.conv{1,2,3}`` (``conv_dw``, ``bn_dw``, ``conv_pw``, ``bn_pw``) are our
``convs.{0,1,2}`` (``depthwise``, ``pointwise`` and their ``norm``), its ``shortcut.conv`` /
``shortcut.bn`` our ``shortcut`` and its ``norm``. Kernel sizes, strides, the atrous scheme
(the block whose stride is removed keeps the previous dilation) and the symmetric padding
(``dilation * (k - 1) // 2``; 0 for the strided 1x1 shortcuts) are the same, so every conv
computes the same thing on the same input. ``head.fc`` (the classifier) is unused.

* BatchNorm epsilon: timm's (and TF DeepLab's) is 1e-3, Detectron2's norms use 1e-5. The
  converter adds the difference to every ``running_var`` (``var + 1e-3 - 1e-5``), so with the
  ImageNet statistics (eval mode, FrozenBN) every BN computes exactly timm's
  ``(x - mean) / sqrt(var + 1e-3)``. In training mode BN normalises by the batch variance
  plus 1e-5 instead of plus 1e-3, a negligible difference.

* The same function with ``MODEL.XCEPTION.LAYOUT tf_deeplab``: our Xception-71 has two ReLU
  placements with the same parameters (see :mod:`deeperlab_d2.modeling.backbone.xception`).
  With ``"tf_deeplab"`` (the released TF DeepLab / timm network) the converted backbone's own
  forward computes timm's block outputs at res2..res5 (``blocks.1``, ``blocks.3``,
  ``blocks.20``, ``blocks.22``), eval mode, at output stride 32 and 16, within float
  rounding (``tests/test_convert.py``). (Not checked at output stride 8: there timm's
  ``xception71(output_stride=8)`` builds ``blocks.4`` with stride 1 and, 728 channels in and
  out, without the 1x1 conv shortcut that its ImageNet weights hold; TF DeepLab and ours keep
  that shortcut at every output stride.) ``--layout`` (default ``tf_deeplab``) only changes the
  report: the tensors are the same for both layouts.

  With ``"paper"`` (the config default: the DeepLabv3+ paper's text) the converted backbone is
  **not** timm's function (the stem is; the first block already differs). The weights all land
  where they belong, but three things differ, which the report of ``--layout paper`` lists:

  1. ReLU inside the separable convs. In timm's blocks 0..21 (``start_with_relu``, TF
     DeepLab's ``activation_fn_in_separable_conv=False``) a separable conv is
     ``ReLU -> depthwise -> BN -> pointwise -> BN``: no ReLU between the depthwise BN and the
     pointwise conv. The paper layout applies one there
     (``depthwise -> BN -> ReLU -> pointwise -> BN [-> ReLU]``), as the DeepLabv3+ paper's
     text describes ("extra BN and ReLU after each 3x3 depthwise convolution") but its
     released code and ImageNet checkpoints do not: 66 extra ReLUs, 3 in each of
     entry_flow1..5, middle_flow1..16 and exit_flow1. No weight can undo a ReLU.
  2. ReLU after the residual sum. timm returns ``branch + shortcut`` without ReLU; the ReLU
     comes first thing in the next block's branch (``stack.act1``), while the next block's
     shortcut (1x1 conv, or identity in the middle flow) reads the sum before that ReLU. The
     paper layout's block returns ``ReLU(branch + shortcut)``, so the shortcuts of
     entry_flow2..5 and exit_flow1 and the identities of middle_flow1..16 read ``ReLU(x)``
     instead of ``x`` (entry_flow1's input is the stem's ReLU output in both: same).
  3. exit_flow2 (timm's ``blocks.22``: no shortcut, ``start_with_relu=False``, TF's
     ``activation_fn_in_separable_conv=True``) has the same layers in both (``depthwise ->
     BN -> ReLU -> pointwise -> BN -> ReLU``, three times), but reads timm's exit-flow-1 sum
     without ReLU and the paper layout's with it.

  :func:`xception71_differences` lists these per block, read from the built modules (empty
  for ``"tf_deeplab"``). With the paper layout the ImageNet weights are an initialisation of
  a related network rather than the pretrained function (how much of their benefit survives
  is not measured here).

* Input: timm's ``xception71`` (like TF DeepLab) was trained on RGB images scaled to [-1, 1]
  (timm's pretrained cfg: mean = std = ``IMAGENET_INCEPTION_MEAN`` / ``_STD`` = 0.5 on [0, 1]),
  i.e. ``MODEL.PIXEL_MEAN`` = ``MODEL.PIXEL_STD`` = ``[127.5, 127.5, 127.5]`` on 0-255
  ``INPUT.FORMAT "RGB"``, not torchvision's ImageNet mean / std.

``--prefix backbone.bottom_up.`` writes the keys of the ``*_fpn_backbone`` models (Detectron2's
FPN keeps the plugin's backbone as ``bottom_up``).
"""

import argparse
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modeling.backbone.mobilenet_v2 import MobileNetV2
from .modeling.backbone.xception import XCEPTION_LAYOUTS, Xception71

__all__ = [
    "BN_NORMS",
    "TIMM_XCEPTION71_BLOCKS",
    "TIMM_XCEPTION71_BN_EPS",
    "TIMM_XCEPTION71_INPUT",
    "TIMM_XCEPTION71_LAYOUT",
    "TIMM_XCEPTION71_PRETRAINED",
    "TORCHVISION_INPUT",
    "Conversion",
    "ConversionError",
    "convert_file",
    "convert_mobilenet_v2",
    "convert_xception71",
    "load_source_state_dict",
    "main",
    "mobilenet_v2_key_map",
    "save_checkpoint",
    "xception71_differences",
    "xception71_key_map",
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
        bn_eps_shifted: target ``running_var`` keys to which ``bn_eps[0] - bn_eps[1]`` was
            added, so that BatchNorm with the target's epsilon computes the source's.
        bn_eps: (source BatchNorm epsilon, target BatchNorm epsilon) when they differ.
        differences: where the target network computes another function than the source
            although every tensor maps (one line each); empty when it is the same function.
        settings: the config values (key -> value, as in a YAML config) the checkpoint must
            be used with for the target to compute the source's function: the backbone
            options, the input normalisation and channel order of the source.
        hints: advice printed after the differences (e.g. how to avoid them).
    """

    state_dict: "OrderedDict[str, torch.Tensor]"
    unused_source: List[str] = field(default_factory=list)
    unfilled_target: List[str] = field(default_factory=list)
    zero_padded: List[str] = field(default_factory=list)
    source: str = "state_dict"
    bn_eps_shifted: List[str] = field(default_factory=list)
    bn_eps: Optional[Tuple[float, float]] = None
    differences: List[str] = field(default_factory=list)
    settings: Dict[str, str] = field(default_factory=dict)
    hints: List[str] = field(default_factory=list)

    def format_report(self) -> str:
        """A human-readable report listing every unused source and unfilled target tensor, and
        where the target is not the source's function."""
        notes = []
        if self.zero_padded:
            notes.append(f"{len(self.zero_padded)} depthwise kernels zero-padded")
        if self.bn_eps_shifted:
            src_eps, tgt_eps = self.bn_eps
            notes.append(
                f"{len(self.bn_eps_shifted)} BatchNorm running_var shifted by "
                f"{src_eps - tgt_eps:+.6g} for BatchNorm eps {src_eps:g} -> {tgt_eps:g}"
            )
        lines = [
            f"converted {len(self.state_dict)} tensors from {self.source}"
            + (f" ({'; '.join(notes)})" if notes else "")
        ]
        lines.append(f"source tensors not used: {len(self.unused_source)}")
        lines += [f"  {k}" for k in self.unused_source]
        lines.append(f"target tensors not filled: {len(self.unfilled_target)}")
        lines += [f"  {k}" for k in self.unfilled_target]
        if self.differences:
            lines.append(
                f"not the same function as the source ({len(self.differences)} differences; "
                "every tensor maps, the layers between them differ):"
            )
            lines += [f"  - {d}" for d in self.differences]
        lines += self.hints
        if self.settings:
            lines.append(
                "use it with these config values"
                + (
                    " (the source's input; the differences above remain):"
                    if self.differences
                    else " (the source network's layout and input):"
                )
            )
            lines += [f"  {k}: {v}" for k, v in self.settings.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# reading and writing
# ------------------------------------------------------------------------------------------


def load_source_state_dict(source: SourceLike) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a classification checkpoint.

    Args:
        source: a state_dict, or the path of a file holding one (``torch.save(model.state_dict())``,
            e.g. torchvision's downloaded weights; or a ``.safetensors`` file, e.g. timm's
            ``model.safetensors`` from the Hugging Face Hub) or a training checkpoint with the
            state_dict under ``"model"`` or ``"state_dict"`` (torchvision's and timm's training
            scripts). A ``module.`` prefix (DataParallel) is removed.

    Raises:
        ConversionError: the file cannot be read as tensors only, or holds no state_dict.
    """
    name = "the source"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise ConversionError(f"source weights {name} do not exist")
        if name.endswith(".safetensors"):
            loaded = _load_safetensors(name)
        else:
            loaded = _load_torch(name)
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


def _load_safetensors(name: str) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ConversionError(
            f"reading {name} needs the safetensors package (pip install safetensors)"
        ) from e
    try:
        return load_file(name, device="cpu")
    except Exception as e:  # header or data errors
        raise ConversionError(
            f"cannot read source weights {name} as safetensors: {type(e).__name__}: {e}"
        ) from e


def _load_torch(name: str):
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated files ...
        raise ConversionError(
            f"cannot read source weights {name} (loaded with weights_only=True): "
            f"{type(e).__name__}: {e}. If it is a training checkpoint holding other Python "
            "objects, save its state_dict alone, e.g. "
            "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')"
        ) from e


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

#: the input of torchvision's ImageNet models: RGB, ImageNet mean / std (on 0-255)
TORCHVISION_INPUT = {
    "MODEL.PIXEL_MEAN": "[123.675, 116.28, 103.53]",
    "MODEL.PIXEL_STD": "[58.395, 57.12, 57.375]",
    "INPUT.FORMAT": '"RGB"',
}


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
    conversion = _convert(
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
    conversion.settings = {
        "MODEL.MOBILENETV2.WIDTH_MULT": f"{width_mult}",
        "MODEL.MOBILENETV2.KERNEL_SIZE": f"{kernel_size}",
        **TORCHVISION_INPUT,
    }
    return conversion


# ------------------------------------------------------------------------------------------
# timm xception71 -> deeperlab_d2 Xception-71
# ------------------------------------------------------------------------------------------

#: the input of timm's ``xception71`` (its pretrained cfg: RGB, mean = std = 0.5 on [0, 1],
#: i.e. [-1, 1]), as Detectron2 config values on 0-255 images
TIMM_XCEPTION71_INPUT = {
    "MODEL.PIXEL_MEAN": "[127.5, 127.5, 127.5]",
    "MODEL.PIXEL_STD": "[127.5, 127.5, 127.5]",
    "INPUT.FORMAT": '"RGB"',
}
#: the Xception-71 layout (``MODEL.XCEPTION.LAYOUT``) that computes timm's ``xception71``
TIMM_XCEPTION71_LAYOUT = "tf_deeplab"
#: BatchNorm epsilon of timm's ``xception71`` (TF DeepLab's ``batch_norm_epsilon``); a
#: state_dict does not record it.
TIMM_XCEPTION71_BN_EPS = 1e-3
#: the timm model whose pretrained weights ``--source timm`` takes (DeepLab's ImageNet
#: checkpoint, timm's default for ``xception71``)
TIMM_XCEPTION71_PRETRAINED = "xception71.tf_in1k"
#: timm's ``xception71`` block_cfg (TF DeepLab's ``xception_71`` blocks), for ``blocks.0`` ..
#: ``blocks.22``: (in channels, channels of the three separable convs, stride, no_skip,
#: start_with_relu)
TIMM_XCEPTION71_BLOCKS = (
    (64, (128, 128, 128), 2, False, True),
    (128, (256, 256, 256), 1, False, True),
    (256, (256, 256, 256), 2, False, True),
    (256, (728, 728, 728), 1, False, True),
    (728, (728, 728, 728), 2, False, True),
    *[(728, (728, 728, 728), 1, False, True)] * 16,
    (728, (728, 1024, 1024), 2, False, True),
    (1024, (1536, 1536, 2048), 1, True, False),
)


def _timm_shortcut(in_channels: int, channels: Sequence[int], stride: int, no_skip: bool) -> str:
    """The shortcut timm's ``XceptionModule`` builds: a 1x1 conv + BN when the channels or the
    resolution change, else the identity; none with ``no_skip``."""
    if no_skip:
        return "none"
    return "conv" if channels[-1] != in_channels or stride != 1 else "identity"


def _build_xception71(norm: str, layout: str = TIMM_XCEPTION71_LAYOUT) -> Xception71:
    """The plugin's Xception-71 at output stride 32 (the nominal strides; dilations change no
    shape) on the meta device: only its structure, shapes, norms and ReLUs are used."""
    with torch.device("meta"):
        return Xception71(output_stride=32, norm=norm, layout=layout)


def _xception71_blocks(backbone: Xception71) -> List[Tuple[str, int, tuple]]:
    """(our block name, timm block index, timm block_cfg) for every block, in order, after
    checking that both have the same input and output channels, stride and shortcut.

    Raises:
        ConversionError: the two layouts differ (the plugin's Xception71 was changed).
    """
    names = list(backbone.stage_names)
    problems = []
    if len(names) != len(TIMM_XCEPTION71_BLOCKS):
        problems.append(f"{len(names)} blocks, timm's xception71 has {len(TIMM_XCEPTION71_BLOCKS)}")
    blocks = []
    for index, (name, cfg) in enumerate(zip(names, TIMM_XCEPTION71_BLOCKS)):
        block = getattr(backbone, name)
        ours = (
            block.convs[0].depthwise.in_channels,
            tuple(conv.pointwise.out_channels for conv in block.convs),
            block.convs[-1].depthwise.stride[0],
            block.shortcut_type,
        )
        theirs = (*cfg[:3], _timm_shortcut(*cfg[:4]))  # in, channels, stride, shortcut
        if ours != theirs:
            problems.append(
                f"{name} (in, channels, stride, shortcut) = {ours}, timm's blocks.{index} {theirs}"
            )
        blocks.append((name, index, cfg))
    if problems:
        raise ConversionError(
            "the plugin's Xception71 does not have the layout of timm's xception71: "
            + "; ".join(problems)
        )
    return blocks


def xception71_key_map(backbone: Optional[Xception71] = None) -> Dict[str, str]:
    """Map the keys of :class:`~deeperlab_d2.modeling.backbone.Xception71` (unprefixed) to
    those of timm's ``xception71``.

    timm's ``stem.{0,1}`` are ``ConvNormAct`` (``.conv``, ``.bn``); ``blocks.{i}`` is our
    i-th block (``entry_flow1..5``, ``middle_flow1..16``, ``exit_flow1..2``, see
    :data:`TIMM_XCEPTION71_BLOCKS`), its ``stack.conv{j+1}`` (``conv_dw``, ``bn_dw``,
    ``conv_pw``, ``bn_pw``) our ``convs.{j}`` (``depthwise``, ``pointwise``, each with
    ``.norm``), its ``shortcut.conv`` / ``shortcut.bn`` our 1x1 ``shortcut`` (blocks with a
    conv shortcut only). ``head.fc`` has no counterpart.

    Args:
        backbone: the target (its structure gives the blocks and shortcuts); default: a
            BN Xception71.

    Raises:
        ConversionError: the block layouts differ.
    """
    backbone = _build_xception71("BN") if backbone is None else backbone
    # (target layer, source conv, source BN)
    layers = [(f"stem.{i}", f"stem.{i}.conv", f"stem.{i}.bn") for i in range(len(backbone.stem))]
    for name, index, _cfg in _xception71_blocks(backbone):
        block, src = getattr(backbone, name), f"blocks.{index}"
        for j in range(len(block.convs)):
            tgt, sep = f"{name}.convs.{j}", f"{src}.stack.conv{j + 1}"
            layers += [
                (f"{tgt}.depthwise", f"{sep}.conv_dw", f"{sep}.bn_dw"),
                (f"{tgt}.pointwise", f"{sep}.conv_pw", f"{sep}.bn_pw"),
            ]
        if block.shortcut is not None:
            layers.append((f"{name}.shortcut", f"{src}.shortcut.conv", f"{src}.shortcut.bn"))
    key_map = {}
    for tgt, src_conv, src_bn in layers:
        key_map[f"{tgt}.weight"] = f"{src_conv}.weight"
        for name in _BN_TENSORS:
            key_map[f"{tgt}.norm.{name}"] = f"{src_bn}.{name}"
    return key_map


def _name_ranges(names: Sequence[str]) -> str:
    """``entry_flow1, entry_flow2, entry_flow3, middle_flow1`` -> ``entry_flow1..3,
    middle_flow1``."""
    groups: List[List] = []  # [stem, first number, last number]
    for name in names:
        stem = name.rstrip("0123456789")
        number = int(name[len(stem) :]) if len(stem) < len(name) else None
        last = groups[-1] if groups else None
        if last and number is not None and last[0] == stem and last[2] == number - 1:
            last[2] = number
        else:
            groups.append([stem, number, number])
    return ", ".join(
        f"{stem}{first}" + (f"..{last}" if last != first else "") if first is not None else stem
        for stem, first, last in groups
    )


def xception71_differences(backbone: Optional[Xception71] = None) -> List[str]:
    """Where the plugin's Xception-71 with timm's weights computes another function than
    timm's ``xception71`` (see the module docstring), one line each; empty if none (the
    ``"tf_deeplab"`` layout).

    Read from the built modules: the ReLU between depthwise BN and pointwise conv from our
    ``SeparableConv2d``'s ``depthwise.activation``; the ReLU after the residual sum (instead
    of before each separable conv) from the blocks with a shortcut whose ``pre_activation``
    (:class:`~deeperlab_d2.modeling.backbone.xception.XceptionBlock`) is not set.

    Args:
        backbone: the target; default: a BN Xception71 of the ``"paper"`` layout.
    """
    backbone = _build_xception71("BN", "paper") if backbone is None else backbone
    blocks = _xception71_blocks(backbone)
    differences = []

    # 1. timm: a ReLU after the depthwise BN only in the blocks without start_with_relu
    extra, missing = [], []
    for name, _index, cfg in blocks:
        timm_relu = not cfg[4]
        for conv in getattr(backbone, name).convs:
            ours_relu = conv.depthwise.activation is not None
            if ours_relu != timm_relu:
                (extra if ours_relu else missing).append(name)
    if extra:
        differences.append(
            "ReLU between the depthwise BN and the pointwise conv: ours has one, timm has none "
            "(TF DeepLab's activation_fn_in_separable_conv=False: a ReLU before each separable "
            f"conv instead) in {len(extra)} separable convs, all those of "
            f"{_name_ranges(list(dict.fromkeys(extra)))}"
        )
    if missing:
        differences.append(
            "ReLU between the depthwise BN and the pointwise conv: ours has none, timm has one "
            f"in {len(missing)} separable convs, all those of "
            f"{_name_ranges(list(dict.fromkeys(missing)))}"
        )

    # 2. ours: ReLU(branch + shortcut); timm: the sum, the next block's branch starts with ReLU
    summed = [
        i
        for i, (name, _, _) in enumerate(blocks)
        if getattr(backbone, name).shortcut_type != "none"
        and not getattr(backbone, name).pre_activation
    ]
    readers = {"conv": [], "identity": []}
    unrectified = []  # 3. blocks whose branch does not start with ReLU in timm either
    for i in summed:
        if i + 1 == len(blocks):
            continue
        name, index, cfg = blocks[i + 1]
        kind = getattr(backbone, name).shortcut_type
        if kind in readers:
            readers[kind].append(name)
        elif not cfg[4]:
            unrectified.append(
                f"{name} (timm's blocks.{index}: no shortcut, a ReLU after every BN in both) "
                f"reads {blocks[i][0]}'s residual sum without ReLU in timm, with ReLU in ours"
            )
    if summed:
        shortcuts = [
            f"the {kind} shortcuts of {_name_ranges(names)}"
            for kind, names in readers.items()
            if names
        ]
        differences.append(
            "ReLU after the residual sum: ours returns ReLU(branch + shortcut) in "
            f"{_name_ranges([blocks[i][0] for i in summed])}, timm the sum (the ReLU comes "
            "first in the next block's branch), so "
            + " and ".join(shortcuts)
            + " read ReLU(x) in ours, x in timm"
        )
    differences += unrectified
    return differences


def _timm_pretrained_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """timm's pretrained :data:`TIMM_XCEPTION71_PRETRAINED` (downloaded from the Hugging Face
    Hub once, then read from its cache)."""
    try:
        import timm
    except ImportError as e:
        raise ConversionError("--source timm needs timm (pip install timm)") from e
    try:
        model = timm.create_model(TIMM_XCEPTION71_PRETRAINED, pretrained=True)
    except Exception as e:  # no network, no cache ...
        raise ConversionError(
            f"cannot get timm's pretrained {TIMM_XCEPTION71_PRETRAINED}: {type(e).__name__}: "
            f'{e}. On a machine with internet, save it with python -c "import timm, torch; '
            f"torch.save(timm.create_model('{TIMM_XCEPTION71_PRETRAINED}', pretrained=True)"
            ".state_dict(), 'xception71_timm_imagenet.pth')\" and pass that file as --source"
        ) from e
    return OrderedDict(model.state_dict())


def _shift_bn_eps(
    conversion: Conversion, backbone: nn.Module, prefix: str, source_eps: float
) -> None:
    """Add ``source_eps - eps`` to the converted ``running_var`` of every BatchNorm of
    ``backbone`` whose ``eps`` differs, so that ``var' + eps = var + source_eps``."""
    shifted, target_eps = [], set()
    for name, module in backbone.named_modules():
        key = f"{prefix}{name}.running_var"
        if not isinstance(getattr(module, "eps", None), float) or key not in conversion.state_dict:
            continue
        if source_eps < module.eps:
            raise ValueError(
                f"source BatchNorm eps {source_eps:g} is smaller than the target's "
                f"{module.eps:g} ({name}): the variances cannot be shifted"
            )
        if source_eps != module.eps:
            var = conversion.state_dict[key]
            conversion.state_dict[key] = (var.double() + (source_eps - module.eps)).to(var.dtype)
            shifted.append(key)
            target_eps.add(module.eps)
    conversion.bn_eps_shifted = shifted
    if target_eps:
        conversion.bn_eps = (source_eps, max(target_eps))


def convert_xception71(
    source: SourceLike,
    norm: str = "BN",
    prefix: str = "backbone.",
    source_bn_eps: Optional[float] = TIMM_XCEPTION71_BN_EPS,
    layout: str = TIMM_XCEPTION71_LAYOUT,
) -> Conversion:
    """Map timm ``xception71`` weights onto the plugin's Xception-71 backbone.

    Args:
        source: timm's ``xception71`` state_dict or its file (``.pth`` or ``.safetensors``,
            see :func:`load_source_state_dict`), or ``"timm"`` for timm's pretrained
            :data:`TIMM_XCEPTION71_PRETRAINED` (downloaded once; needs internet or timm's
            Hugging Face cache).
        norm: ``MODEL.XCEPTION.NORM`` of the target, a BatchNorm variant (see
            :data:`BN_NORMS`); it decides whether ``num_batches_tracked`` is kept (FrozenBN
            has none) and the target's BatchNorm epsilon.
        prefix: prepended to the backbone keys (``backbone.`` for the meta-architectures;
            ``backbone.bottom_up.`` for ``build_xception71_fpn_backbone``).
        source_bn_eps: the source's BatchNorm epsilon (timm: 1e-3); the converted
            ``running_var`` are shifted by its difference to the target's (1e-5), so that
            BatchNorm with the ImageNet statistics computes timm's. ``None``: copied as they
            are.
        layout: ``MODEL.XCEPTION.LAYOUT`` of the target. The tensors are the same for both
            layouts; it decides the report: ``"tf_deeplab"`` (default) computes timm's
            function, ``"paper"`` does not (the differences are listed).

    Returns:
        a :class:`Conversion`; its report lists ``head.fc.*`` as unused (the classifier), no
        unfilled target, the places where our blocks compute another function than timm's
        (:func:`xception71_differences`: none for ``"tf_deeplab"``) and the config values to
        use (``settings``: the layout, timm's input normalisation and channel order).

    Raises:
        ConversionError: a tensor missing from the source or of another shape (e.g. another
            timm Xception), naming the tensor and both shapes; or ``"timm"`` could not be
            fetched.
        ValueError: bad ``norm``, ``source_bn_eps`` or ``layout``.
    """
    if norm not in BN_NORMS:
        raise ValueError(
            f"norm must be one of {BN_NORMS} (ImageNet BatchNorm statistics), got {norm!r}"
        )
    if layout not in XCEPTION_LAYOUTS:
        raise ValueError(f"layout must be one of {XCEPTION_LAYOUTS}, got {layout!r}")
    if isinstance(source, str) and source == "timm":
        source_name = f"timm {TIMM_XCEPTION71_PRETRAINED} (pretrained)"
        source_state = _timm_pretrained_state_dict()
    else:
        source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
        source_state = load_source_state_dict(source)
    backbone = _build_xception71(norm, layout)
    conversion = _convert(
        source_state,
        backbone.state_dict(),
        xception71_key_map(backbone),
        (),
        prefix,
        source_name,
        hint=(
            "The source must be timm's xception71 state_dict "
            "(timm.create_model('xception71', pretrained=True).state_dict(), or its "
            "model.safetensors); xception41 / xception65 and the pre-activation xception41p / "
            "xception65p have other blocks."
        ),
    )
    if source_bn_eps is not None:
        _shift_bn_eps(conversion, backbone, prefix, source_bn_eps)
    conversion.differences = xception71_differences(backbone)
    conversion.settings = {"MODEL.XCEPTION.LAYOUT": f'"{layout}"', **TIMM_XCEPTION71_INPUT}
    if not conversion.differences:
        conversion.hints.append(
            f'the same function as the source: with MODEL.XCEPTION.LAYOUT "{layout}" every '
            "ReLU is where timm's xception71 has it (eval-mode features equal)"
        )
    else:
        conversion.hints.append(
            f'with MODEL.XCEPTION.LAYOUT "{TIMM_XCEPTION71_LAYOUT}" (--layout '
            f"{TIMM_XCEPTION71_LAYOUT}) the converted backbone computes timm's function"
        )
    return conversion


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
        also = " and the config values above" if conversion.settings else ""
        print(f"wrote {output}: set MODEL.WEIGHTS {output}{also}")
    return conversion


def _add_io_arguments(
    parser: argparse.ArgumentParser, source_help: str = "source weights file (.pth)"
) -> None:
    parser.add_argument("--source", required=True, help=source_help)
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument(
        "--prefix",
        default="backbone.",
        help="prefix of the backbone keys in the model: 'backbone.' (default) for DeeperLab and "
        "Panoptic-DeepLab, 'backbone.bottom_up.' for the *_fpn_backbone models",
    )


def _run_mobilenet_v2(args) -> Conversion:
    return convert_file(
        convert_mobilenet_v2,
        args.source,
        args.output,
        width_mult=args.width_mult,
        kernel_size=args.kernel_size,
        norm=args.norm,
        prefix=args.prefix,
    )


def _run_xception71(args) -> Conversion:
    return convert_file(
        convert_xception71,
        args.source,
        args.output,
        norm=args.norm,
        prefix=args.prefix,
        source_bn_eps=args.source_bn_eps,
        layout=args.layout,
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
    x71 = sub.add_parser(
        "xception71",
        help="timm xception71 -> Xception-71 (build_xception71_backbone)",
        description="timm xception71 state_dict -> build_xception71_backbone. Use the "
        "MODEL.XCEPTION.NORM of the config you train. With MODEL.XCEPTION.LAYOUT tf_deeplab "
        "the converted backbone computes timm's features; with the paper layout the report "
        "lists where its blocks place ReLUs differently (every tensor maps; the function "
        "differs). The report ends with the config values to train with.",
    )
    _add_io_arguments(
        x71,
        source_help="timm xception71 state_dict file (.pth, or .safetensors as timm's "
        f"model.safetensors), or 'timm' for timm's pretrained {TIMM_XCEPTION71_PRETRAINED} "
        "(downloads it once: needs internet or the Hugging Face cache)",
    )
    x71.add_argument(
        "--norm",
        default="BN",
        choices=BN_NORMS,
        help="MODEL.XCEPTION.NORM (FrozenBN drops num_batches_tracked) (default BN, as the config)",
    )
    x71.add_argument(
        "--source-bn-eps",
        type=float,
        default=TIMM_XCEPTION71_BN_EPS,
        help="BatchNorm eps of the source; running_var is shifted by its difference to the "
        f"target's (1e-5) so BN computes the same (default {TIMM_XCEPTION71_BN_EPS:g}, timm's)",
    )
    x71.add_argument(
        "--layout",
        default=TIMM_XCEPTION71_LAYOUT,
        choices=XCEPTION_LAYOUTS,
        help="MODEL.XCEPTION.LAYOUT of the config you train; the checkpoint is the same for "
        f"both, only the report differs (default {TIMM_XCEPTION71_LAYOUT}: timm's function; "
        "paper: lists the differences)",
    )
    x71.set_defaults(run=_run_xception71)
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
