"""Keypoint Hough voting: offsets + weights -> vote maps, as a compiled op with a PyTorch oracle.

Source pixel ``(y, x)`` of channel ``k`` casts ``weights[n, k, y, x]`` at the output position
``((y + dy) * scale, (x + dx) * scale)``, ``(dy, dx) = offsets[n, k, :, y, x]`` in pixels, where
integer output coordinates are cell centers. Each vote is splatted bilinearly onto its 4
neighbouring cells (``floor`` / ``floor + 1``, weights ``(1 - fy)(1 - fx)``, ``(1 - fy) fx``,
``fy (1 - fx)``, ``fy fx``); taps outside the output grid are dropped one by one (a vote near the
border keeps its in-grid taps), and votes whose offset or weight is NaN/inf cast nothing.

:func:`splat_points` is the sparse entry point: it casts votes from a list of points (e.g. only
the pixels that carry weight), ``(y, x) * scale`` for a point at ``(y, x)`` input pixels, with
the same tap arithmetic; splatting every pixel at ``(y + dy, x + dx)`` gives the same maps as
:func:`hough_voting` up to summation order.

Two implementations of each op with the same semantics:

* ``torch.ops.deeperlab_d2.hough_voting`` / ``torch.ops.deeperlab_d2.splat_points`` (C++/CUDA,
  ``deeperlab_d2/layers/csrc``), built into ``deeperlab_d2._C`` by ``pip install -e .`` or
  ``python setup.py build_ext --inplace``;
* :func:`hough_voting_reference` / :func:`splat_points_reference`, pure PyTorch on any device:
  the test oracles and the fallbacks.

:func:`hough_voting` and :func:`splat_points` validate their inputs and pick the compiled op when
it has a kernel for the input's device, else the reference; that fallback is chosen from the
build and the device (never by catching errors) and, on a real device, announced once per op
and device type by a :class:`ReferenceFallbackWarning` (the reference is 16-27x slower). Neither
implementation is differentiable (inference only): no autograd formula is registered.

Every vote computes its four taps with the same float32 operations, each rounded on its own
(no fused multiply-add: see ``csrc/voting_common.h``), so a cell that receives a single tap is
bit-equal across implementations and devices; sums of several taps agree up to float32
summation order. The CPU kernels are deterministic for a given ``torch.get_num_threads()``
(``hough_voting`` splits planes, or row ranges of planes, across threads, ``splat_points``
contiguous chunks of points; partial sums are added in a fixed order); the CUDA kernels add with
``atomicAdd``, so their last bits may vary from run to run.

This module needs only torch (no Detectron2).
"""

import importlib
import importlib.util
import math
import warnings
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "HAS_COMPILED_OP",
    "ReferenceFallbackWarning",
    "compiled_op_available",
    "compiled_with_cuda",
    "hough_voting",
    "hough_voting_reference",
    "splat_points",
    "splat_points_reference",
]

_OP_NAME = "deeperlab_d2::hough_voting"
_SPLAT_OP_NAME = "deeperlab_d2::splat_points"

# A missing extension (not built) selects the reference; a present but broken one (ABI mismatch,
# missing symbol) raises here, loudly.
if importlib.util.find_spec("deeperlab_d2._C") is not None:
    _C = importlib.import_module("deeperlab_d2._C")
else:
    _C = None

#: True when ``deeperlab_d2._C`` is built and registered ``torch.ops.deeperlab_d2.hough_voting``.
HAS_COMPILED_OP = _C is not None and torch._C._dispatch_has_kernel(_OP_NAME)
# False for an extension built before splat_points existed (rebuild it).
_HAS_SPLAT_OP = _C is not None and torch._C._dispatch_has_kernel(_SPLAT_OP_NAME)


class ReferenceFallbackWarning(UserWarning):
    """Issued once per op and device type when :func:`hough_voting` or :func:`splat_points`
    runs the (much slower) pure-PyTorch reference because ``deeperlab_d2._C`` has no kernel for
    the device, e.g. a CUDA tensor with an extension built without nvcc."""


def _check_op_args(offsets, weights, out_h, out_w, scale):
    # Mirrors check_hough_voting_args in csrc/hough_voting.cpp, for the fake implementation.
    torch._check(
        offsets.dim() == 5,
        lambda: (
            f"hough_voting: offsets must be a 5-D tensor [N, K, 2, H, W], got shape "
            f"{tuple(offsets.shape)}"
        ),
    )
    torch._check(
        offsets.shape[2] == 2,
        lambda: (
            f"hough_voting: offsets must have size 2 (dy, dx) in dim 2, got shape "
            f"{tuple(offsets.shape)}"
        ),
    )
    torch._check(
        weights.dim() == 4,
        lambda: (
            f"hough_voting: weights must be a 4-D tensor [N, K, H, W], got shape "
            f"{tuple(weights.shape)}"
        ),
    )
    n, k, _, h, w = offsets.shape
    torch._check(
        tuple(weights.shape) == (n, k, h, w),
        lambda: (
            f"hough_voting: weights shape {tuple(weights.shape)} does not match offsets "
            f"shape {tuple(offsets.shape)}"
        ),
    )
    torch._check(
        offsets.dtype == torch.float32,
        lambda: f"hough_voting: offsets must be float32, got {offsets.dtype}",
    )
    torch._check(
        weights.dtype == torch.float32,
        lambda: f"hough_voting: weights must be float32, got {weights.dtype}",
    )
    torch._check(
        offsets.device == weights.device,
        lambda: (
            f"hough_voting: offsets and weights must be on the same device, got offsets on "
            f"{offsets.device} and weights on {weights.device}"
        ),
    )
    torch._check(
        out_h >= 0 and out_w >= 0,
        lambda: f"hough_voting: out_h and out_w must be >= 0, got {out_h}, {out_w}",
    )
    torch._check(
        math.isfinite(scale) and scale > 0,
        lambda: f"hough_voting: scale must be finite and > 0, got {scale}",
    )


if HAS_COMPILED_OP:

    @torch.library.register_fake(_OP_NAME)
    def _hough_voting_fake(offsets, weights, out_h, out_w, scale):
        _check_op_args(offsets, weights, out_h, out_w, scale)
        return offsets.new_empty((offsets.shape[0], offsets.shape[1], out_h, out_w))


def _check_splat_op_args(points, weights, map_index, num_maps, out_h, out_w, scale):
    # Mirrors check_splat_points_args in csrc/splat_points.cpp, for the fake implementation.
    torch._check(
        points.dim() == 2 and points.shape[1] == 2,
        lambda: (
            f"splat_points: points must be a 2-D tensor [M, 2] of (y, x) positions, got shape "
            f"{tuple(points.shape)}"
        ),
    )
    torch._check(
        weights.dim() == 1 and weights.shape[0] == points.shape[0],
        lambda: (
            f"splat_points: weights must be a 1-D tensor [M] with M = {points.shape[0]} (one "
            f"weight per point), got shape {tuple(weights.shape)}"
        ),
    )
    torch._check(
        map_index.dim() == 1 and map_index.shape[0] == points.shape[0],
        lambda: (
            f"splat_points: map_index must be a 1-D tensor [M] with M = {points.shape[0]} (one "
            f"map per point), got shape {tuple(map_index.shape)}"
        ),
    )
    torch._check(
        points.dtype == torch.float32,
        lambda: f"splat_points: points must be float32, got {points.dtype}",
    )
    torch._check(
        weights.dtype == torch.float32,
        lambda: f"splat_points: weights must be float32, got {weights.dtype}",
    )
    torch._check(
        map_index.dtype == torch.int64,
        lambda: f"splat_points: map_index must be int64, got {map_index.dtype}",
    )
    torch._check(
        points.device == weights.device == map_index.device,
        lambda: (
            f"splat_points: points, weights and map_index must be on the same device, got "
            f"points on {points.device}, weights on {weights.device} and map_index on "
            f"{map_index.device}"
        ),
    )
    torch._check(num_maps >= 0, lambda: f"splat_points: num_maps must be >= 0, got {num_maps}")
    torch._check(
        out_h >= 0 and out_w >= 0,
        lambda: f"splat_points: out_h and out_w must be >= 0, got {out_h}, {out_w}",
    )
    torch._check(
        math.isfinite(scale) and scale > 0,
        lambda: f"splat_points: scale must be finite and > 0, got {scale}",
    )


if _HAS_SPLAT_OP:

    @torch.library.register_fake(_SPLAT_OP_NAME)
    def _splat_points_fake(points, weights, map_index, num_maps, out_h, out_w, scale):
        _check_splat_op_args(points, weights, map_index, num_maps, out_h, out_w, scale)
        return points.new_empty((num_maps, out_h, out_w))


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _kernel_device_types(op_name, registered):
    # Querying the dispatcher does not initialize CUDA.
    return frozenset(
        device_type
        for device_type, key in _DISPATCH_KEYS.items()
        if registered and torch._C._dispatch_has_kernel_for_dispatch_key(op_name, key)
    )


# Device types with a kernel, computed once (a set lookup stays traceable by torch.compile).
_KERNEL_DEVICE_TYPES = _kernel_device_types(_OP_NAME, HAS_COMPILED_OP)
_SPLAT_KERNEL_DEVICE_TYPES = _kernel_device_types(_SPLAT_OP_NAME, _HAS_SPLAT_OP)

# The fused post-processing kernels (csrc/postprocess_cpu.cpp: CPU only; on other devices the
# post-processing composes the ops above): device types with a kernel, per op.
_FUSED_OPS = ("class_argmax", "keypoint_votes", "assign_pixels")
_FUSED_KERNEL_DEVICE_TYPES = {
    name: _kernel_device_types(
        f"deeperlab_d2::{name}",
        _C is not None and torch._C._dispatch_has_kernel(f"deeperlab_d2::{name}"),
    )
    for name in _FUSED_OPS
}

_OPS = ("hough_voting", "splat_points") + _FUSED_OPS

if _FUSED_KERNEL_DEVICE_TYPES["class_argmax"]:

    @torch.library.register_fake("deeperlab_d2::class_argmax")
    def _class_argmax_fake(logits, flags):
        torch._check(logits.dim() == 4, lambda: "class_argmax: logits must be [N, C, H, W]")
        n, _, h, w = logits.shape
        return (
            logits.new_empty((n, h, w), dtype=torch.long),
            logits.new_empty((n, h, w), dtype=torch.bool),
        )


if _FUSED_KERNEL_DEVICE_TYPES["keypoint_votes"]:

    @torch.library.register_fake("deeperlab_d2::keypoint_votes")
    def _keypoint_votes_fake(heatmap_logits, short_offsets, long_offsets, pixels, *args):
        torch._check(
            heatmap_logits.dim() == 3, lambda: "keypoint_votes: heatmap_logits must be [P, H, W]"
        )
        p = heatmap_logits.shape[0]
        return (
            torch.empty_like(heatmap_logits),
            torch.empty_like(heatmap_logits),
            heatmap_logits.new_empty((pixels.shape[0], p, 2)),
        )


if _FUSED_KERNEL_DEVICE_TYPES["assign_pixels"]:

    @torch.library.register_fake("deeperlab_d2::assign_pixels")
    def _assign_pixels_fake(pixel_keypoints, pixels, instance_keypoints, height, width):
        return pixel_keypoints.new_empty((height, width), dtype=torch.long)


def _op_device_types(op):
    # Looked up at call time so that tests can monkeypatch the sets.
    if op == "hough_voting":
        return _KERNEL_DEVICE_TYPES
    if op == "splat_points":
        return _SPLAT_KERNEL_DEVICE_TYPES
    if op in _FUSED_KERNEL_DEVICE_TYPES:
        return _FUSED_KERNEL_DEVICE_TYPES[op]
    raise ValueError(f"compiled_op_available: op must be one of {_OPS}, got {op!r}")


def compiled_op_available(device, op: str = "hough_voting") -> bool:
    """Whether the compiled op is built and has a kernel for ``device``.

    Args:
        device: a ``torch.device``, a device string (``"cpu"``, ``"cuda:1"``) or a tensor.
        op: ``"hough_voting"`` (default), ``"splat_points"``, or one of the fused
            post-processing kernels ``"class_argmax"``, ``"keypoint_votes"``,
            ``"assign_pixels"`` (CPU only).

    Returns:
        True when ``torch.ops.deeperlab_d2.<op>`` is registered with a kernel for the device's
        type (``"cuda"`` needs an extension compiled with nvcc).
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type in _op_device_types(op)


def _why_unavailable(op, device_type) -> str:
    if _C is None:
        return (
            "deeperlab_d2._C is not built (pip install --no-build-isolation -e . or "
            "python setup.py build_ext --inplace)"
        )
    if op == "splat_points" and not _HAS_SPLAT_OP:
        return "deeperlab_d2._C predates splat_points: rebuild it (pip install -e .)"
    if op in _FUSED_OPS and not _FUSED_KERNEL_DEVICE_TYPES[op]:
        return f"deeperlab_d2._C predates {op}: rebuild it (pip install -e .)"
    return (
        f"deeperlab_d2._C has no {device_type} kernel (compiled with CUDA: "
        f"{compiled_with_cuda()}; rebuild with nvcc and CUDA_HOME set for CUDA)"
    )


# (op, device type) pairs already warned about.
_WARNED_FALLBACKS = set()


def _warn_fallback(op, device_type):
    """Warns once per (op, device type) that the reference runs instead of a compiled kernel."""
    if device_type == "meta" or (op, device_type) in _WARNED_FALLBACKS:
        return  # meta tensors only need shapes: the reference is what they should run
    if torch.compiler.is_compiling():
        return
    _WARNED_FALLBACKS.add((op, device_type))
    warnings.warn(
        f"deeperlab_d2: {op} on {device_type} tensors runs the pure-PyTorch reference "
        f"(about 16-27x slower than the compiled kernel): {_why_unavailable(op, device_type)}. "
        "This warning is shown once per op and device type.",
        ReferenceFallbackWarning,
        stacklevel=4,  # the caller of hough_voting / splat_points
    )


def _use_compiled(op, device, use_compiled) -> bool:
    """Resolves ``use_compiled`` (None / True / False) for ``op`` on ``device``."""
    available = device.type in _op_device_types(op)
    if use_compiled is None:
        if not available:
            _warn_fallback(op, device.type)
        return available
    if use_compiled and not available:
        raise RuntimeError(
            f"{op}: use_compiled=True but the compiled op is not available for device "
            f"{device}: {_why_unavailable(op, device.type)}"
        )
    return bool(use_compiled)


def compiled_with_cuda() -> bool:
    """Whether ``deeperlab_d2._C`` exists and was compiled with its CUDA kernel.

    Returns:
        True for an extension built with nvcc, False otherwise (no GPU is needed to check).
    """
    return _C is not None and bool(_C.compiled_with_cuda())


def _is_int(value) -> bool:
    return isinstance(value, (Integral, torch.SymInt)) and not isinstance(value, bool)


def _validate(offsets, weights, out_size, scale) -> Tuple[int, int, float]:
    """Checks the arguments of :func:`hough_voting`; returns ``(out_h, out_w, scale)``."""
    for name, tensor in (("offsets", offsets), ("weights", weights)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"hough_voting: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype != torch.float32:
            raise TypeError(f"hough_voting: {name} must be float32, got {tensor.dtype}")
    if offsets.dim() != 5 or offsets.shape[2] != 2:
        raise ValueError(
            "hough_voting: offsets must have shape [N, K, 2, H, W] with (dy, dx) in dim 2, got "
            f"{tuple(offsets.shape)}"
        )
    n, k, _, h, w = offsets.shape
    if weights.dim() != 4 or tuple(weights.shape) != (n, k, h, w):
        raise ValueError(
            f"hough_voting: weights must have shape [N, K, H, W] = {(n, k, h, w)} to match "
            f"offsets {tuple(offsets.shape)}, got {tuple(weights.shape)}"
        )
    if offsets.device != weights.device:
        raise ValueError(
            "hough_voting: offsets and weights must be on the same device, got offsets on "
            f"{offsets.device} and weights on {weights.device}"
        )
    return _validate_out_size_scale("hough_voting", out_size, scale)


def _validate_out_size_scale(op, out_size, scale) -> Tuple[int, int, float]:
    if (
        isinstance(out_size, (str, bytes))
        or not isinstance(out_size, Sequence)
        or len(out_size) != 2
        or not all(_is_int(v) for v in out_size)
    ):
        raise TypeError(f"{op}: out_size must be a pair of ints (out_h, out_w), got {out_size!r}")
    out_h, out_w = out_size
    if out_h < 0 or out_w < 0:
        raise ValueError(f"{op}: out_size must be non-negative, got {tuple(out_size)}")
    if not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be finite and > 0, got {scale}")
    return out_h, out_w, scale


def _splat_taps(out, py, px, weights, plane, out_h: int, out_w: int) -> None:
    """The references' bilinear splat (one definition for both entry points): each vote of
    weight ``weights`` at scaled position ``(py, px)`` adds to map ``plane`` of ``out``
    (flattened ``[maps * out_h * out_w]``) on its 4 neighbouring cells; taps outside the grid
    are dropped, non-finite positions and zero / non-finite weights cast nothing. ``plane`` is
    broadcastable to ``py``; static shapes (invalid votes get weight 0)."""
    # NaN/inf positions fail the range comparisons as well.
    valid = (
        (weights != 0)
        & torch.isfinite(weights)
        & (py > -1)
        & (py < out_h)
        & (px > -1)
        & (px < out_w)
    )
    wgt = torch.where(valid, weights, 0.0)
    py = torch.where(valid, py, 0.0)
    px = torch.where(valid, px, 0.0)
    y0f = torch.floor(py)
    x0f = torch.floor(px)
    ay = py - y0f
    ax = px - x0f
    y0 = y0f.long()
    x0 = x0f.long()
    plane_row = torch.where(valid, plane, 0) * out_h
    for dy, wy in ((0, 1.0 - ay), (1, ay)):
        yy = y0 + dy
        rows = plane_row + yy
        y_in = valid & (yy >= 0) & (yy < out_h)
        for dx, wx in ((0, 1.0 - ax), (1, ax)):
            xx = x0 + dx
            inside = y_in & (xx >= 0) & (xx < out_w)
            index = torch.where(inside, rows * out_w + xx, 0)
            value = torch.where(inside, wy * wx * wgt, 0.0)
            out.index_add_(0, index.reshape(-1), value.reshape(-1))


def hough_voting_reference(
    offsets: torch.Tensor,
    weights: torch.Tensor,
    out_size: Sequence[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """Hough voting in plain PyTorch (any device): the oracle of the compiled op and its fallback.

    Shapes are static (invalid votes get weight 0 rather than being filtered out), so it also
    runs on meta/fake tensors and under ``torch.compile``. Not differentiable in a meaningful
    way (the output is piecewise in the offsets) and not meant to be.

    Args:
        offsets: float32 ``[N, K, 2, H, W]`` offsets in pixels, ``(dy, dx)`` along dim 2.
        weights: float32 ``[N, K, H, W]`` vote weights, on the device of ``offsets``.
        out_size: ``(out_h, out_w)`` of the vote map.
        scale: positions ``(y + dy, x + dx)`` are multiplied by it (e.g. 0.25 to vote at a
            quarter of the input resolution).

    Returns:
        float32 ``[N, K, out_h, out_w]`` vote maps.
    """
    out_h, out_w, scale = _validate(offsets, weights, out_size, scale)
    n, k, _, h, w = offsets.shape
    device = offsets.device
    out = torch.zeros(n * k * out_h * out_w, dtype=torch.float32, device=device)
    if out.numel() == 0 or weights.numel() == 0:
        return out.view(n, k, out_h, out_w)

    ys = torch.arange(h, dtype=torch.float32, device=device).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=device).view(1, w)
    py = (ys + offsets[:, :, 0]) * scale
    px = (xs + offsets[:, :, 1]) * scale
    plane = torch.arange(n * k, device=device).view(n, k, 1, 1)
    _splat_taps(out, py, px, weights, plane, out_h, out_w)
    return out.view(n, k, out_h, out_w)


def hough_voting(
    offsets: torch.Tensor,
    weights: torch.Tensor,
    out_size: Sequence[int],
    scale: float = 1.0,
    *,
    use_compiled: Optional[bool] = None,
) -> torch.Tensor:
    """Bilinear Hough voting of keypoint offsets (see the module docstring for the exact rule).

    Not differentiable: use it at inference (no gradient reaches ``offsets`` or ``weights``).

    Args:
        offsets: float32 ``[N, K, 2, H, W]`` offsets in pixels, ``(dy, dx)`` along dim 2.
        weights: float32 ``[N, K, H, W]`` vote weights, on the device of ``offsets``. Zero,
            NaN and inf weights cast nothing, nor do votes with a NaN/inf offset.
        out_size: ``(out_h, out_w)`` of the vote map.
        scale: positions ``(y + dy, x + dx)`` are multiplied by it before splatting.
        use_compiled: None (default) uses the compiled op when it has a kernel for the input's
            device, else :func:`hough_voting_reference` (with a :class:`ReferenceFallbackWarning`
            once per device type); True requires the compiled op (RuntimeError if it is not
            built for that device); False forces the reference.

    Returns:
        float32 ``[N, K, out_h, out_w]`` vote maps on the input's device.
    """
    out_h, out_w, scale = _validate(offsets, weights, out_size, scale)
    if _use_compiled("hough_voting", offsets.device, use_compiled):
        return torch.ops.deeperlab_d2.hough_voting(offsets, weights, out_h, out_w, scale)
    return hough_voting_reference(offsets, weights, (out_h, out_w), scale)


# ------------------------------------------------------------------------------------------
# splat_points: the sparse entry point
# ------------------------------------------------------------------------------------------
def _validate_splat(points, weights, map_index, num_maps, out_size, scale):
    """Checks the arguments of :func:`splat_points`; returns ``(num_maps, out_h, out_w, scale)``."""
    for name, tensor, dtype in (
        ("points", points, torch.float32),
        ("weights", weights, torch.float32),
        ("map_index", map_index, torch.int64),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"splat_points: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype != dtype:
            raise TypeError(f"splat_points: {name} must be {dtype}, got {tensor.dtype}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(
            f"splat_points: points must have shape [M, 2] of (y, x) positions, got "
            f"{tuple(points.shape)}"
        )
    m = points.shape[0]
    for name, tensor in (("weights", weights), ("map_index", map_index)):
        if tensor.dim() != 1 or tensor.shape[0] != m:
            raise ValueError(
                f"splat_points: {name} must have shape [M] = [{m}] to match points "
                f"{tuple(points.shape)}, got {tuple(tensor.shape)}"
            )
    if not (points.device == weights.device == map_index.device):
        raise ValueError(
            "splat_points: points, weights and map_index must be on the same device, got "
            f"points on {points.device}, weights on {weights.device} and map_index on "
            f"{map_index.device}"
        )
    if not _is_int(num_maps):
        raise TypeError(f"splat_points: num_maps must be an int, got {type(num_maps).__name__}")
    if num_maps < 0:
        raise ValueError(f"splat_points: num_maps must be >= 0, got {num_maps}")
    out_h, out_w, scale = _validate_out_size_scale("splat_points", out_size, scale)
    return num_maps, out_h, out_w, scale


def _check_map_index_range(map_index, num_maps):
    """Raises IndexError (as the CPU kernel does) for a map index outside [0, num_maps).

    Eager only: under torch.compile (fake tensors) it becomes an asynchronous assertion; meta
    tensors have no values to check.
    """
    if map_index.numel() == 0 or map_index.device.type == "meta":
        return
    in_range = (map_index >= 0) & (map_index < num_maps)
    if torch.compiler.is_compiling():
        torch._assert_async(in_range.all(), "splat_points: map_index out of range [0, num_maps)")
        return
    if not bool(in_range.all()):
        first = int((~in_range).nonzero()[0, 0])
        raise IndexError(
            f"splat_points: map_index[{first}] = {int(map_index[first])} is out of range "
            f"[0, num_maps) with num_maps = {num_maps}"
        )


def splat_points_reference(
    points: torch.Tensor,
    weights: torch.Tensor,
    map_index: torch.Tensor,
    num_maps: int,
    out_size: Sequence[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """Point splatting in plain PyTorch (any device): the oracle of the compiled op and its
    fallback. Same arguments and result as :func:`splat_points` (without ``use_compiled``).

    Shapes are static (points that cast nothing get weight 0), so it also runs on meta/fake
    tensors and under ``torch.compile``. Checking ``map_index`` synchronizes with the GPU.
    """
    num_maps, out_h, out_w, scale = _validate_splat(
        points, weights, map_index, num_maps, out_size, scale
    )
    _check_map_index_range(map_index, num_maps)
    device = points.device
    out = torch.zeros(num_maps * out_h * out_w, dtype=torch.float32, device=device)
    if out.numel() == 0 or points.shape[0] == 0:
        return out.view(num_maps, out_h, out_w)

    py = points[:, 0] * scale
    px = points[:, 1] * scale
    _splat_taps(out, py, px, weights, map_index, out_h, out_w)
    return out.view(num_maps, out_h, out_w)


def splat_points(
    points: torch.Tensor,
    weights: torch.Tensor,
    map_index: torch.Tensor,
    num_maps: int,
    out_size: Sequence[int],
    scale: float = 1.0,
    *,
    use_compiled: Optional[bool] = None,
) -> torch.Tensor:
    """Bilinear Hough voting from a list of points (the sparse counterpart of
    :func:`hough_voting`, e.g. to vote only from the pixels that carry weight).

    Point ``m`` casts ``weights[m]`` at ``(points[m, 0] * scale, points[m, 1] * scale)`` of map
    ``map_index[m]``, splatted bilinearly on the 4 neighbouring cells exactly like
    :func:`hough_voting` (same float32 tap arithmetic; taps outside the grid dropped one by one;
    zero, NaN and inf weights and NaN/inf points cast nothing). For a dense field,
    ``splat_points`` of every pixel at ``(y + dy, x + dx)`` (computed in float32) with
    ``map_index = n * K + k`` equals ``hough_voting(...).view(N * K, H, W)`` up to summation
    order. Not differentiable.

    Args:
        points: float32 ``[M, 2]`` ``(y, x)`` positions in input pixels.
        weights: float32 ``[M]`` vote weights.
        map_index: int64 ``[M]`` map of each point, in ``[0, num_maps)`` (e.g. ``n * K + k``);
            checked for every point (IndexError on the CPU; a device-side assertion in the
            CUDA kernel).
        num_maps: number of output maps.
        out_size: ``(out_h, out_w)`` of each map.
        scale: positions are multiplied by it before splatting (e.g. 0.25 to vote at a quarter
            of the input resolution).
        use_compiled: None (default) uses the compiled op when it has a kernel for the input's
            device, else :func:`splat_points_reference` (with a :class:`ReferenceFallbackWarning`
            once per device type); True requires the compiled op (RuntimeError if it is not
            built for that device); False forces the reference.

    Returns:
        float32 ``[num_maps, out_h, out_w]`` vote maps on the input's device.
    """
    num_maps, out_h, out_w, scale = _validate_splat(
        points, weights, map_index, num_maps, out_size, scale
    )
    if _use_compiled("splat_points", points.device, use_compiled):
        return torch.ops.deeperlab_d2.splat_points(
            points, weights, map_index, num_maps, out_h, out_w, scale
        )
    return splat_points_reference(points, weights, map_index, num_maps, (out_h, out_w), scale)
