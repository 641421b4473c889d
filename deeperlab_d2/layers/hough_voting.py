"""Keypoint Hough voting: offsets + weights -> vote maps, as a compiled op with a PyTorch oracle.

Source pixel ``(y, x)`` of channel ``k`` casts ``weights[n, k, y, x]`` at the output position
``((y + dy) * scale, (x + dx) * scale)``, ``(dy, dx) = offsets[n, k, :, y, x]`` in pixels, where
integer output coordinates are cell centers. Each vote is splatted bilinearly onto its 4
neighbouring cells (``floor`` / ``floor + 1``, weights ``(1 - fy)(1 - fx)``, ``(1 - fy) fx``,
``fy (1 - fx)``, ``fy fx``); taps outside the output grid are dropped one by one (a vote near the
border keeps its in-grid taps), and votes whose offset or weight is NaN/inf cast nothing.

Two implementations with the same semantics:

* ``torch.ops.deeperlab_d2.hough_voting`` (C++/CUDA, ``deeperlab_d2/layers/csrc``), built into
  ``deeperlab_d2._C`` by ``pip install -e .`` or ``python setup.py build_ext --inplace``;
* :func:`hough_voting_reference`, pure PyTorch on any device: the test oracle and the fallback.

:func:`hough_voting` validates its inputs and picks the compiled op when it has a kernel for the
input's device. Neither implementation is differentiable (inference only): no autograd formula
is registered, so gradients do not flow to ``offsets`` or ``weights``.

Results agree up to float32 summation order. The CPU kernel is deterministic for a given
``torch.get_num_threads()`` (planes, or row ranges of planes, are split across threads and
partial sums are added in a fixed order); the CUDA kernel adds with ``atomicAdd``, so its last
bits may vary from run to run.

This module needs only torch (no Detectron2).
"""

import importlib
import importlib.util
import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "HAS_COMPILED_OP",
    "compiled_op_available",
    "compiled_with_cuda",
    "hough_voting",
    "hough_voting_reference",
]

_OP_NAME = "deeperlab_d2::hough_voting"

# A missing extension (not built) selects the reference; a present but broken one (ABI mismatch,
# missing symbol) raises here, loudly.
if importlib.util.find_spec("deeperlab_d2._C") is not None:
    _C = importlib.import_module("deeperlab_d2._C")
else:
    _C = None

#: True when ``deeperlab_d2._C`` is built and registered ``torch.ops.deeperlab_d2.hough_voting``.
HAS_COMPILED_OP = _C is not None and torch._C._dispatch_has_kernel(_OP_NAME)


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


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}

# Device types with a kernel, computed once (a set lookup stays traceable by torch.compile).
# Querying the dispatcher does not initialize CUDA.
_KERNEL_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in _DISPATCH_KEYS.items()
    if HAS_COMPILED_OP and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key)
)


def compiled_op_available(device) -> bool:
    """Whether the compiled op is built and has a kernel for ``device``.

    Args:
        device: a ``torch.device``, a device string (``"cpu"``, ``"cuda:1"``) or a tensor.

    Returns:
        True when ``torch.ops.deeperlab_d2.hough_voting`` is registered with a kernel for the
        device's type (``"cuda"`` needs an extension compiled with nvcc).
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type in _KERNEL_DEVICE_TYPES


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
    if (
        isinstance(out_size, (str, bytes))
        or not isinstance(out_size, Sequence)
        or len(out_size) != 2
        or not all(_is_int(v) for v in out_size)
    ):
        raise TypeError(
            f"hough_voting: out_size must be a pair of ints (out_h, out_w), got {out_size!r}"
        )
    out_h, out_w = out_size
    if out_h < 0 or out_w < 0:
        raise ValueError(f"hough_voting: out_size must be non-negative, got {tuple(out_size)}")
    if not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"hough_voting: scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"hough_voting: scale must be finite and > 0, got {scale}")
    return out_h, out_w, scale


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
    plane_row = torch.arange(n * k, device=device).view(n, k, 1, 1) * out_h
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
            device, else :func:`hough_voting_reference`; True requires the compiled op
            (RuntimeError if it is not built for that device); False forces the reference.

    Returns:
        float32 ``[N, K, out_h, out_w]`` vote maps on the input's device.
    """
    out_h, out_w, scale = _validate(offsets, weights, out_size, scale)
    available = compiled_op_available(offsets.device)
    if use_compiled is None:
        use_compiled = available
    elif use_compiled and not available:
        if _C is None:
            why = (
                "deeperlab_d2._C is not built (pip install --no-build-isolation -e . or "
                "python setup.py build_ext --inplace)"
            )
        else:
            why = (
                f"deeperlab_d2._C has no {offsets.device.type} kernel (compiled with CUDA: "
                f"{compiled_with_cuda()}; rebuild with nvcc and CUDA_HOME set for CUDA)"
            )
        raise RuntimeError(
            f"hough_voting: use_compiled=True but the compiled op is not available for device "
            f"{offsets.device}: {why}"
        )
    if use_compiled:
        return torch.ops.deeperlab_d2.hough_voting(offsets, weights, out_h, out_w, scale)
    return hough_voting_reference(offsets, weights, (out_h, out_w), scale)
