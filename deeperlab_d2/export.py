"""Export the DeeperLab network (image -> head outputs) with ``torch.export`` and to ONNX.

Usage::

    python -m deeperlab_d2.export --config-file configs/synthetic/<config>.yaml \\
        --output exported/ [--format onnx|torch-export|both] [--opset 18] \\
        [--sample-size H W] [--tolerance 1e-4] [--input-format raw|normalized] \\
        [--allow-random-weights] [--opts MODEL.WEIGHTS model_final.pth KEY VALUE ...]

``--opts`` takes config overrides (``KEY VALUE`` pairs) and must come last. The command builds
the model of the config, loads ``MODEL.WEIGHTS`` (an error naming the file when it is missing,
unreadable or does not fit the model; an empty ``MODEL.WEIGHTS`` is an error unless
``--allow-random-weights``), exports :class:`ExportableDeeperLab` (BatchNorm in eval mode), checks
the exported model against the eager one at two input sizes (printing the largest absolute
difference of every output) and writes, for ``--output DIR`` (default format ``both``)::

    DIR/deeperlab.pt2   torch.export.save(ExportedProgram)      (torch-export)
    DIR/deeperlab.onnx  ONNX, opset 18, checked with ONNX Runtime (onnx)
    DIR/deeperlab.json  the input contract, output names, dynamic-shape constraints, the
                        thing classes and the measured differences

(``--output X.onnx`` / ``X.pt2`` name the files ``X.onnx``, ``X.pt2`` and ``X.json``).

What is exported: the network only, :meth:`DeeperLab.predict` behind a wrapper with one input and
a tuple of outputs (:data:`INPUT_NAME`, :meth:`ExportableDeeperLab.output_names`). The
post-processing (Hough voting / center grouping, panoptic fusion) stays in PyTorch and runs
unchanged on the exported model's outputs: :meth:`DeeperLab.panoptic` or
:meth:`DeeperLab.inference` of a model built from the same config (the weights are not needed
for it), or :func:`~deeperlab_d2.layers.post_processing.deeperlab_panoptic_inference` /
:func:`~deeperlab_d2.layers.center_post_processing.panoptic_deeplab_inference`. The
post-processing does not export itself: see :data:`POST_PROCESSING_EXPORT`.

Input contract (``--input-format raw``, the default): ``image`` float32 [N, 3, H, W], pixel values
0-255 in ``INPUT.FORMAT`` channel order (RGB for every config of this repository), already
resized as Detectron2's test mapper does (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST,
INPUT.MAX_SIZE_TEST)``, outside the graph), and padded at the bottom/right to H, W multiples of
:func:`input_multiple` (16 at output stride 16) with the *pixel mean* (:func:`pad_image`).
Inside the graph: ``(image - PIXEL_MEAN) / PIXEL_STD``, the network, the bilinear upsampling of
every head to H x W. This is exactly :meth:`DeeperLab.preprocess` + :meth:`DeeperLab.predict`:
``preprocess`` normalizes then pads with 0, i.e. pads with the mean before normalization.
``--input-format normalized`` leaves the normalization out of the graph: the input is then
``model.preprocess(images).tensor``.

Dynamic shapes: N >= 1, H = m * h and W = m * w with ``h, w >= 2`` (``torch.export.Dim``
multiples, m = :func:`input_multiple`). The backbone's stride-2 convs give ``ceil(H / 2)``
rows, so any H would run up to the decoder, but the space-to-depth decoder folds the stride-4
feature (``ceil(H / 4)`` rows) into the encoder grid (``ceil(H / stride)`` rows) and needs
the first to be exactly ``stride / 4`` times the second: with H a multiple of the encoder stride
every feature map is exactly ``H / stride`` and every shape in the graph is linear in h, w.
h = 1 (a single encoder cell) is excluded by ``torch.export``'s 0/1 specialization (ONNX
Runtime runs H = m too). Other sizes fail: the exported program with ``AssertionError: Guard
failed: ...``, ONNX Runtime in the Reshape of the space-to-depth; :func:`pad_image` avoids both.

ASPP image pooling: the exported graph averages over the whole input. The eager
``DeeperLab.forward`` averages each image over the encoder cells its valid (unpadded) part
covers; for a single image (or images of one size) padded to the next multiple of
``SIZE_DIVISIBILITY``, that is the whole map whenever ``SIZE_DIVISIBILITY`` equals the encoder
stride (the default, ``-1``), so the exported model's outputs are those of the eager pipeline.
With a larger ``SIZE_DIVISIBILITY`` they differ; the command warns.

Measured (torch 2.14, ONNX Runtime 1.31 CPU, the tiny synthetic models trained, inputs up to
208 x 288): the exported program's outputs equal the eager ones bitwise; ONNX Runtime's differ
by at most ~1e-6 of the output's scale (6e-5 px on long-range offsets of up to 68 px), and the
panoptic results computed from them are identical.
"""

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "POST_PROCESSING_EXPORT",
    "ExportError",
    "ExportResult",
    "ExportableDeeperLab",
    "build_parser",
    "dynamic_shapes",
    "export_model",
    "export_onnx",
    "export_torch",
    "input_multiple",
    "load_exported_program",
    "main",
    "max_abs_differences",
    "onnx_session",
    "outputs_as_dict",
    "pad_image",
    "run_onnx",
    "setup_cfg",
]

INPUT_NAME = "image"
DEFAULT_OPSET = 18
FORMATS = ("onnx", "torch-export", "both")
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
_DEFAULT_STEM = "deeperlab"
_EXAMPLE_BATCH = 2  # a batch of 1 would make torch.export specialize N to 1

#: What happens when the post-processing itself goes through ``torch.export.export`` (torch
#: 2.14), recorded by hand and checked by ``tests/test_export.py``. The compiled ops
#: (``torch.ops.deeperlab_d2.class_argmax``, ``keypoint_votes``, ``hough_voting``,
#: ``splat_points``) are not the obstacle: they trace through their fake kernels. The obstacle is
#: data-dependent shapes feeding Python control flow: ``torch.nonzero`` of the thing mask /
#: of the heatmap peaks gives an unbacked size ``u0``, and the code then needs its value.
POST_PROCESSING_EXPORT = {
    "keypoints": (
        "GuardOnDataDependentSymNode: 'Could not extract specialized integer from "
        "data-dependent expression u1' at deeperlab_d2/layers/post_processing.py, "
        "deeperlab_instances: counts = torch.bincount(pn, minlength=N).tolist() (the thing "
        "pixels per image, used to split the batch in a Python loop)"
    ),
    "center": (
        "GuardOnDataDependentSymNode: 'Could not guard on data-dependent expression u0 > 200' "
        "at deeperlab_d2/layers/center_post_processing.py, find_centers: "
        "if n.numel() > top_k (the number of heatmap peaks decides a Python branch)"
    ),
}


class ExportError(RuntimeError):
    """Export cannot run (a missing file, a bad option) or its result differs from the eager
    model by more than the tolerance."""


# ------------------------------------------------------------------------------------------
# the exported module and its input contract
# ------------------------------------------------------------------------------------------


class ExportableDeeperLab(nn.Module):
    """``image`` [N, 3, H, W] -> the tuple of :meth:`DeeperLab.predict`'s outputs.

    Args:
        model: a :class:`~deeperlab_d2.modeling.DeeperLab` (put in eval mode here: BatchNorm
            uses its running statistics, dropout is off).
        normalize_input: True: the input is raw pixels (0-255, ``INPUT.FORMAT`` order) and
            ``(image - pixel_mean) / pixel_std`` is part of the graph; False: the input is
            already normalized (``model.preprocess(images).tensor``).

    Outputs, in :attr:`output_names` order: ``sem_seg`` [N, C, H, W] logits, then the instance
    branch's ``output_names``: keypoints: ``heatmap`` [N, 5, H, W] logits, ``short_offsets`` /
    ``long_offsets`` [N, 5, 2, H, W], ``mid_offsets`` [N, 8, 2, H, W]; center:
    ``center_heatmap`` [N, 1, H, W], ``center_offsets`` [N, 1, 2, H, W]; offsets are (dy, dx) in
    input pixels.
    """

    def __init__(self, model: nn.Module, normalize_input: bool = True):
        super().__init__()
        self.model = model.eval()
        self.normalize_input = normalize_input
        self.output_names: Tuple[str, ...] = ("sem_seg", *model.instance_branch.output_names)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = image
        if self.normalize_input:
            x = (image - self.model.pixel_mean) / self.model.pixel_std
        # image_sizes None: the whole input is valid (see the module docstring, ASPP pooling)
        out = self.model.predict(x)
        return tuple(out[k] for k in self.output_names)


def input_multiple(model: nn.Module) -> int:
    """The multiple H and W of the exported model's input must be: the least common multiple
    of the model's ``size_divisibility`` (what :meth:`DeeperLab.preprocess` pads to) and the
    encoder stride (what the space-to-depth decoder needs)."""
    stride = model.backbone.output_shape()[model.in_feature].stride
    return math.lcm(max(int(model.size_divisibility), 1), int(stride))


def pad_image(image: torch.Tensor, model: nn.Module) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """One image as the exported model's raw input, and its valid size.

    Args:
        image: [3, h, w] (uint8 or float) pixels in ``INPUT.FORMAT`` order, already resized.
        model: the DeeperLab model (pixel mean, :func:`input_multiple`).

    Returns:
        ([1, 3, H, W] float32 padded at the bottom/right to multiples of
        :func:`input_multiple` with the pixel mean, (h, w)): normalized in the graph, the
        padding becomes the zeros :meth:`DeeperLab.preprocess` pads with.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, h, w], got shape {tuple(image.shape)}")
    m = input_multiple(model)
    h, w = int(image.shape[1]), int(image.shape[2])
    H, W = max(-(-h // m), 2) * m, max(-(-w // m), 2) * m
    mean = model.pixel_mean.detach().to("cpu", torch.float32)
    out = mean.expand(3, H, W).clone()
    out[:, :h, :w] = image.to("cpu", torch.float32)
    return out[None], (h, w)


def dynamic_shapes(model: nn.Module) -> Dict[str, Dict[int, object]]:
    """The ``torch.export`` dynamic shapes of the input: batch ``N >= 1``, ``H = m * h``,
    ``W = m * w`` with ``h, w >= 2`` (m = :func:`input_multiple`)."""
    from torch.export import Dim

    m = input_multiple(model)
    return {
        INPUT_NAME: {
            0: Dim("batch", min=1),
            2: m * Dim("h_cells", min=2),
            3: m * Dim("w_cells", min=2),
        }
    }


def outputs_as_dict(
    outputs: Sequence, names: Sequence[str], device="cpu"
) -> Dict[str, torch.Tensor]:
    """The exported model's outputs (tensors or numpy arrays, e.g. ONNX Runtime's) as the dict
    :meth:`DeeperLab.predict` returns, for :meth:`DeeperLab.panoptic` / ``inference``."""
    if len(outputs) != len(names):
        raise ValueError(f"{len(outputs)} outputs for {len(names)} names {list(names)}")
    return {k: torch.as_tensor(v, device=device) for k, v in zip(names, outputs)}


# ------------------------------------------------------------------------------------------
# export and check
# ------------------------------------------------------------------------------------------


def export_torch(wrapper: ExportableDeeperLab, example: torch.Tensor):
    """``torch.export.export`` of ``wrapper`` with :func:`dynamic_shapes` (``example``: an
    input of batch >= 2 satisfying the constraints)."""
    wrapper.eval()
    with _out_of_place_activations(wrapper):
        return torch.export.export(
            wrapper, (example,), dynamic_shapes=dynamic_shapes(wrapper.model), strict=False
        )


@contextlib.contextmanager
def _out_of_place_activations(module: nn.Module):
    """Trace ``relu`` / ``hardtanh`` instead of ``relu_`` / ``hardtanh_`` (same values; the
    modules' ``inplace`` flags are restored afterwards).

    In-place activations have no ONNX translation: ``torch.onnx.export`` decomposes them
    through PyTorch's Python reference implementations, which on symbolic shapes is slow (the
    tiny model's ONNX conversion: 47 s of CPU time with them, 30 s without).
    """
    flagged = [m for m in module.modules() if getattr(m, "inplace", False) is True]
    try:
        for m in flagged:
            m.inplace = False
        yield
    finally:
        for m in flagged:
            m.inplace = True


def load_exported_program(path: str):
    """``torch.export.load`` of a ``.pt2`` written by this module; ``.module()`` runs it."""
    return torch.export.load(path)


def export_onnx(exported_program, path: str, output_names: Sequence[str], opset: int):
    """Convert an exported program (:func:`export_torch`) to ONNX (``torch.onnx.export``,
    ``dynamo=True``) and save it to ``path``. The dynamic axes are named ``batch``, ``H`` and
    ``W``."""
    if opset < 17:
        raise ExportError(f"--opset must be >= 17, got {opset}")
    program = torch.onnx.export(
        exported_program,
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        optimize=True,
        verbose=False,
        # with an exported program, only names the axes (instead of torch.export's s0, 16*s1)
        dynamic_shapes={INPUT_NAME: {0: "batch", 2: "H", 3: "W"}},
    )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    program.save(path)
    return program


def onnx_session(path: str):
    """An ONNX Runtime CPU session for ``path`` (:class:`ExportError` when onnxruntime is not
    installed: ``pip install onnxruntime``, the ``export`` extra)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            "onnxruntime is not installed: it checks the ONNX model (pip install onnxruntime)"
        ) from e
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(session, image: torch.Tensor) -> List[torch.Tensor]:
    """Run an ONNX Runtime session on ``image``; the outputs as CPU tensors."""
    out = session.run(None, {INPUT_NAME: image.detach().cpu().float().numpy()})
    return [torch.from_numpy(o) for o in out]


def max_abs_differences(
    reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], names: Sequence[str]
) -> Dict[str, Tuple[float, float]]:
    """Per output name: (max |reference - actual|, max |reference|)."""
    result = {}
    for name, ref, act in zip(names, reference, actual):
        ref, act = ref.detach().cpu().float(), act.detach().cpu().float()
        if tuple(ref.shape) != tuple(act.shape):
            raise ExportError(
                f"output {name}: shape {tuple(act.shape)} instead of {tuple(ref.shape)}"
            )
        diff = float((ref - act).abs().max()) if ref.numel() else 0.0
        result[name] = (diff, float(ref.abs().max()) if ref.numel() else 0.0)
    return result


def _within(diffs: Dict[str, Tuple[float, float]], tolerance: float) -> bool:
    # max |a - b| <= tolerance * max(1, max |a|): relative to the output's scale, absolute
    # below 1 (offsets of an untrained model are ~1e-6 px)
    return all(d <= tolerance * max(1.0, scale) for d, scale in diffs.values())


def _sample_inputs(model, sample_size, seed: int = 0) -> List[torch.Tensor]:
    # two raw inputs of different sizes and batches (valid for the dynamic-shape constraints)
    m = input_multiple(model)
    h, w = (max(-(-int(s) // m), 2) for s in sample_size)
    g = torch.Generator().manual_seed(seed)
    sizes = [(_EXAMPLE_BATCH, h, w), (1, h + 1, w + 2)]
    return [torch.rand(n, 3, a * m, b * m, generator=g) * 255 for n, a, b in sizes]


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        files: format ("onnx", "torch-export", "json") -> path written.
        max_abs_diff: format -> input shape ("1x3x80x112") -> output name -> max |eager -
            exported| over the sample input.
        output_scale: input shape -> output name -> max |eager output|.
        output_names: the exported outputs, in order.
        program: the ``torch.export.ExportedProgram`` (also when only ONNX was written).
    """

    files: Dict[str, str] = field(default_factory=dict)
    max_abs_diff: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    output_scale: Dict[str, Dict[str, float]] = field(default_factory=dict)
    output_names: Tuple[str, ...] = ()
    program: object = field(default=None, repr=False)

    def worst(self, fmt: str) -> float:
        """The largest difference of format ``fmt`` over every size and output."""
        return max(d for per in self.max_abs_diff[fmt].values() for d in per.values())


def _output_paths(output: str, formats: Sequence[str]) -> Dict[str, str]:
    lower = output.lower()
    for fmt, suffix in _SUFFIX.items():
        if lower.endswith(suffix):
            if fmt not in formats:
                raise ExportError(
                    f"--output {output} ends with {suffix} but --format does not include {fmt}"
                )
            stem = output[: -len(suffix)]
            break
    else:
        stem = os.path.join(output, _DEFAULT_STEM)
    paths = {fmt: stem + _SUFFIX[fmt] for fmt in formats}
    paths["json"] = stem + ".json"
    return paths


def _shape(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape)


def _check_and_report(result, fmt, outputs_fn, eager, inputs, names, tolerance, log):
    result.max_abs_diff[fmt] = {}
    for x, ref in zip(inputs, eager):
        diffs = max_abs_differences(ref, outputs_fn(x), names)
        key = _shape(x)
        result.max_abs_diff[fmt][key] = {k: d for k, (d, _) in diffs.items()}
        result.output_scale[key] = {k: s for k, (_, s) in diffs.items()}
        text = ", ".join(f"{k} {d:.3g} (of {s:.3g})" for k, (d, s) in diffs.items())
        log(f"  {fmt} vs eager at {key}: max abs diff {text}")
        if not _within(diffs, tolerance):
            raise ExportError(
                f"{fmt}: the exported model differs from the eager one at input {key} by more "
                f"than --tolerance {tolerance} x max(1, output scale): {text}"
            )


def export_model(
    cfg,
    output: str,
    formats: Sequence[str] = ("onnx", "torch-export"),
    *,
    opset: int = DEFAULT_OPSET,
    sample_size: Sequence[int] = (64, 96),
    tolerance: float = 1e-4,
    normalize_input: bool = True,
    allow_random_weights: bool = False,
    config_file: str = "",
    verbose: bool = True,
) -> ExportResult:
    """Build the model of ``cfg``, load ``MODEL.WEIGHTS``, export, check against eager, write.

    Args:
        cfg: a Detectron2 config with the DeeperLab keys.
        output: a directory, or a file ending with ``.onnx`` / ``.pt2`` (see the module
            docstring).
        formats: "onnx" and/or "torch-export".
        opset: ONNX opset (>= 17).
        sample_size: (H, W) of the check inputs (rounded up to the input multiple); a second
            input of another size and batch checks the dynamic shapes.
        tolerance: largest accepted ``max |eager - exported| / max(1, max |eager|)``.
        normalize_input: see :class:`ExportableDeeperLab`.
        allow_random_weights: accept an empty ``MODEL.WEIGHTS``.
        config_file: recorded in the JSON file.

    Raises:
        ExportError, FileNotFoundError, ValueError, CheckpointError: see :func:`main`.
    """
    from detectron2.modeling import build_model

    from .checkpoint import load_model_weights

    log = print if verbose else (lambda *a, **k: None)
    formats = [f for f in ("torch-export", "onnx") if f in formats]
    paths = _output_paths(output, formats)
    model = build_model(cfg)
    load_model_weights(model, cfg.MODEL.WEIGHTS, allow_random=allow_random_weights)
    model.eval()
    wrapper = ExportableDeeperLab(model, normalize_input=normalize_input).eval()
    names = wrapper.output_names
    m = input_multiple(model)
    stride = model.backbone.output_shape()[model.in_feature].stride
    if model.size_divisibility > stride:
        log(
            f"warning: SIZE_DIVISIBILITY {model.size_divisibility} > encoder stride {stride}: "
            "the eager model's ASPP image pooling averages an image over its valid part, the "
            "exported one over the whole (padded) input; their outputs differ on padded images"
        )
    inputs = [x.to(model.device) for x in _sample_inputs(model, sample_size)]
    if not normalize_input:
        inputs = [(x - model.pixel_mean) / model.pixel_std for x in inputs]
    result = ExportResult(output_names=names)
    pixels = f"{cfg.INPUT.FORMAT} 0-255" if normalize_input else "normalized"
    log(
        f"exporting the {cfg.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION} model: input "
        f"{INPUT_NAME} float32 [N, 3, H, W] ({pixels}), H and W multiples of {m}, >= {2 * m}; "
        f"outputs {', '.join(names)}"
    )
    with torch.no_grad():
        eager = [wrapper(x) for x in inputs]
    ep = result.program = export_torch(wrapper, inputs[0])
    with torch.no_grad():
        _check_and_report(result, "torch-export", ep.module(), eager, inputs, names, tolerance, log)
    if "torch-export" in formats:
        os.makedirs(os.path.dirname(os.path.abspath(paths["torch-export"])), exist_ok=True)
        torch.export.save(ep, paths["torch-export"])
        result.files["torch-export"] = paths["torch-export"]
        log(f"wrote {paths['torch-export']} (torch.export.load(path).module())")
    if "onnx" in formats:
        export_onnx(ep, paths["onnx"], names, opset)
        session = onnx_session(paths["onnx"])
        _check_and_report(
            result, "onnx", lambda x: run_onnx(session, x), eager, inputs, names, tolerance, log
        )
        result.files["onnx"] = paths["onnx"]
        log(f"wrote {paths['onnx']} (opset {opset}, checked with ONNX Runtime on the CPU)")
    _write_json(paths["json"], cfg, model, wrapper, m, opset, result, config_file)
    result.files["json"] = paths["json"]
    log(f"wrote {paths['json']}")
    return result


def _write_json(path, cfg, model, wrapper, m, opset, result, config_file):
    info = {
        "config_file": config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "instance_representation": cfg.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, "H", "W"],
            "dtype": "float32",
            "normalized_in_graph": wrapper.normalize_input,
            "channel_order": cfg.INPUT.FORMAT,
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "resize_before": {
                "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            },
            "pad": "bottom/right to multiples of size_multiple, with pixel_mean (raw input) "
            "or 0 (normalized input)",
            "size_multiple": m,
            "min_size": 2 * m,
        },
        "outputs": list(wrapper.output_names),
        "thing_ids": model.thing_ids,
        "onnx_opset": opset if "onnx" in result.files else None,
        "files": {k: os.path.basename(v) for k, v in result.files.items()},
        "max_abs_diff": result.max_abs_diff,
        "output_scale": result.output_scale,
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m deeperlab_d2.export",
        description="Export the DeeperLab network (image -> head outputs) with torch.export "
        "and/or to ONNX, checked against the eager model.",
    )
    p.add_argument("--config-file", required=True, help="the model's config (.yaml)")
    p.add_argument(
        "--output",
        required=True,
        help="a directory (writes deeperlab.onnx / .pt2 / .json in it) or a file X.onnx / "
        "X.pt2 (writes X.onnx, X.pt2, X.json)",
    )
    p.add_argument("--format", choices=FORMATS, default="both", help="default: both")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 17)")
    p.add_argument(
        "--sample-size",
        type=int,
        nargs=2,
        default=(64, 96),
        metavar=("H", "W"),
        help="size of the inputs the check runs (rounded up to the input multiple; default "
        "64 96); a second input of another size checks the dynamic shapes",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest accepted max|eager - exported| / max(1, max|eager|) (default 1e-4)",
    )
    p.add_argument(
        "--input-format",
        choices=("raw", "normalized"),
        default="raw",
        help="raw: 0-255 pixels, normalized in the graph (default); normalized: "
        "(pixels - PIXEL_MEAN) / PIXEL_STD, done by the caller",
    )
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export with an empty MODEL.WEIGHTS (random initialisation) on purpose",
    )
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides, e.g. --opts MODEL.WEIGHTS model_final.pth (must come last)",
    )
    return p


def setup_cfg(config_file: str, opts: Sequence[str]):
    """The config of ``config_file`` with ``opts``; an :class:`ExportError` naming the path
    when the file does not exist."""
    from detectron2.config import get_cfg

    from .config import add_deeperlab_config

    if not os.path.isfile(config_file):
        raise ExportError(f"--config-file {config_file} does not exist")
    if len(opts) % 2:
        raise ExportError(f"--opts takes KEY VALUE pairs, got {len(opts)} words: {list(opts)}")
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError) as e:
        raise ExportError(f"--config-file {config_file}: {e}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ExportError(f"--opts {' '.join(opts)}: {e}") from e
    cfg.freeze()
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> ExportResult:
    """Command-line entry point; returns the :class:`ExportResult`. Errors (a missing config
    or weights file, weights that do not fit, an exported model outside the tolerance) print
    ``error: ...`` and exit with status 1."""
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    formats = ("onnx", "torch-export") if args.format == "both" else (args.format,)
    try:
        cfg = setup_cfg(args.config_file, args.opts)
        return export_model(
            cfg,
            args.output,
            formats,
            opset=args.opset,
            sample_size=args.sample_size,
            tolerance=args.tolerance,
            normalize_input=args.input_format == "raw",
            allow_random_weights=args.allow_random_weights,
            config_file=args.config_file,
        )
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
