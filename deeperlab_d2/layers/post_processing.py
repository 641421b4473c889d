"""DeeperLab post-processing: head outputs -> panoptic segmentation (SPEC §4).

Plain, stateless functions that need only torch (no Detectron2), so they run and are tested on
any machine. Conventions used everywhere below:

* positions are ``(y, x)`` in pixels of the network input (integer = pixel center);
* offset fields are ``[..., K, 2, H, W]`` with ``(dy, dx)`` along the ``2`` axis;
* keypoint order and star graph are those of :mod:`deeperlab_d2.layers.keypoints`.

Pipeline (:func:`deeperlab_panoptic_inference`):

1. :func:`refine_long_offsets` - recursive refinement ``L_k(x) += S_k(x + L_k(x))`` at thing
   pixels; middle-range offsets are refined the same way, lazily, at the few points where they
   are followed (:func:`follow_mid_offsets`).
2. :func:`hough_score_maps` - short-range votes (weight = heatmap probability, dense op) and
   long-range votes (weight 1, from the thing pixels only: the op's sparse entry point
   ``splat_points``) splatted bilinearly, normalized by the disk area ``pi R^2`` and fused by
   a weighted sum.
3. :func:`find_keypoints` - local maxima of the fused maps (:func:`local_peaks`), sub-pixel
   refined, scored on the short-range map alone (:func:`support_scores`: the probability x
   OKS of the votes each keypoint's cell received, independent of the instance's area and of
   the crowd around it), queued by fused expected-OKS vote mass (:func:`expected_oks_scores`).
4. :func:`group_instances` - greedy decoding in queue order along the star graph (a corner
   whose walk through the center is suspect takes the keypoints its own pixels predict), a
   keypoint NMS scaled to each instance (:func:`rejection_radii`); instance score = mean
   support score of its keypoints; then :func:`box_nms`.
5. :func:`assign_pixels` - each thing pixel to the instance whose keypoints are nearest to its
   predicted keypoints, in pixel chunks (never an ``[instances x H*W]`` tensor).
6. :func:`fuse_panoptic` - majority-vote instance classes, stuff segments, final id map (one
   histogram and one table lookup of each pixel's (instance, class) pair).

Speed: on the CPU, the semantic labels and the thing mask are one pass of the fused kernel
``deeperlab_d2::class_argmax`` (:func:`classify_pixels`), and steps 1-2 one call of the fused
kernel ``deeperlab_d2::keypoint_votes`` per image (:func:`keypoint_votes`: the refinement at the
thing pixels and both vote maps, two passes over the head outputs); their pure-PyTorch
references (:func:`semantic_labels`, :func:`keypoint_votes_reference`) are the oracles and what
runs on other devices (there they compose the Hough-voting ops, which have CUDA kernels). The
peak search reads only the rows of the maps that exceed the threshold (:func:`local_peaks`; on
the CPU the row scan is the compiled ``deeperlab_d2::cells_above``), and the fusion's two passes
(histogram of the (instance, class) pairs, table lookup) are compiled on the CPU too
(``panoptic_histogram``, ``panoptic_lookup``; :data:`CPU_KERNELS`, each beside its
pure-PyTorch reference). The grouping walks the middle-range offsets of the 4 edges in one
batch, and the keypoint search scores every type's expected-OKS mass in one batch (the values of
the per-edge and per-type functions, bit for bit). The thing pixels are found once, and the
refinement, the long-range votes and the assignment run on them only. A few host
synchronizations per image, none per instance: the same code runs on
CUDA. ``python benchmarks/bench_postprocess.py`` times every stage.

Robustness: the head outputs may come in any floating dtype (bfloat16/float16 under autocast,
float64): they are cast to float32 at the entry and everything runs with autocast disabled (the
Hough-voting op takes float32; pixel-to-instance distances need float32). Non-finite semantic
logits (NaN, +-inf) never win the argmax (:func:`semantic_labels`): a pixel takes the argmax of
its finite logits, and a pixel without any is void.
"""

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .hough_voting import _use_compiled, compiled_op_available, hough_voting, splat_points
from .keypoints import CENTER, KEYPOINT_EDGES, NUM_EDGES, NUM_KEYPOINTS  # noqa: F401


def _has_cpu_kernel(name: str) -> bool:
    # whether deeperlab_d2._C (loaded by .hough_voting when built) registered a CPU kernel
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"deeperlab_d2::{name}", "CPU")
    except RuntimeError:  # no such op (not built, or built before it existed)
        return False


#: The compiled CPU kernels of this module beside the fused ones of ``hough_voting``
#: (``csrc/postprocess_cpu.cpp``): the peak search's cells above the threshold and the two passes
#: of the fusion. Each has its pure-PyTorch reference here (the path of other devices, and of
#: the CPU when this set is empty; the tests compare the two).
CPU_KERNELS = frozenset(
    name
    for name in ("cells_above", "panoptic_histogram", "panoptic_lookup")
    if _has_cpu_kernel(name)
)


def _cpu_kernel(name: str, tensor: torch.Tensor) -> bool:
    """Whether the compiled kernel ``name`` of :data:`CPU_KERNELS` runs on ``tensor``."""
    return tensor.device.type == "cpu" and name in CPU_KERNELS


@dataclass
class PostProcessConfig:
    """Every threshold of the post-processing. The defaults live in the Detectron2 config only
    (``MODEL.DEEPERLAB.POST_PROCESS.*``, ``TARGETS.KEYPOINT_RADIUS``): build it with
    :func:`deeperlab_d2.config.post_process_config`."""

    keypoint_radius: float  # R: the disk radius used in training; normalizes votes
    refine_steps: int
    short_vote_weight: float
    long_vote_weight: float
    min_vote_prob: float  # short-range votes with a smaller heatmap probability skip
    peak_kernel: int  # max-pool window of the local-maximum test
    peak_threshold: float  # fused score-map value a local maximum needs
    max_keypoints: int  # per keypoint type and image
    oks_sigma: float  # px, Gaussian of the expected-OKS rescoring
    keypoint_threshold: float  # support score (or fused vote mass) a candidate needs
    keypoint_nms_radius: float  # px, largest same-type keypoint rejection radius
    instance_score_threshold: float
    box_nms_threshold: float
    max_instances: int
    thing_area: int  # instances with fewer pixels are dropped (void)
    stuff_area: int  # stuff segments with fewer pixels are dropped (void)
    # pixels per chunk in the pixel-to-instance assignment (memory bound, not a threshold)
    assign_chunk: int = 1 << 16


# --------------------------------------------------------------------------------------------
# dtype and non-finite values
# --------------------------------------------------------------------------------------------
def mask_nonfinite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Replace non-finite logits (NaN, +inf, -inf) by the lowest finite value of the dtype.

    ``torch.argmax`` treats NaN as the maximum; after this, an argmax over the classes picks
    the largest finite logit (a pixel with no finite logit gets class 0). A finite floor, not
    ``-inf``, so that softmax and bilinear resizing stay NaN-free. One pass (``nan_to_num``).
    """
    low = torch.finfo(logits.dtype).min
    return torch.nan_to_num(logits, nan=low, posinf=low, neginf=low)


def semantic_labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of [N, C, H, W] logits: argmax over the finite logits of the pixel
    (the first such class on a tie).

    One pass over the logits when they are finite: ``max`` over the classes gives each pixel's
    largest logit and its first index; that value is finite exactly where the pixel has a
    finite logit and no NaN or +inf (``max`` propagates NaN, and -inf never wins over a finite
    logit), and then the index is the answer. Only the other pixels (found through one sum of
    the maxima) are redone from their own logits.

    Returns:
        [N, H, W] int64; -1 (void) where no logit of the pixel is finite.
    """
    best, labels = logits.max(1)
    # a finite sum <=> every maximum is finite (or an overflow of finite ones: nothing to redo)
    if not bool(torch.isfinite(best.sum())):
        n, y, x = torch.nonzero(~torch.isfinite(best), as_tuple=True)
        sub = logits[n, :, y, x]  # [B, C], the pixels with a NaN, a +inf or no finite logit
        finite = torch.isfinite(sub)
        fixed = torch.where(finite, sub, float("-inf")).argmax(1)
        labels[n, y, x] = torch.where(finite.any(1), fixed, -1)
    return labels


def _class_lut(num_classes: int, class_ids: Sequence[int], device) -> torch.Tensor:
    """[C + 1] bool table, True at ``class_ids``: ``torch.take(lut, labels)`` of labels in
    [-1, C) is the membership of each label, -1 (void; the last entry) never a member."""
    lut = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    lut[list(class_ids)] = True
    return lut


def classify_pixels(
    logits: torch.Tensor, flagged_ids: Sequence[int], use_compiled: Optional[bool] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`semantic_labels` of [N, C, H, W] float32 logits and whether each pixel's class is
    one of ``flagged_ids`` (e.g. the thing classes; a void pixel is not).

    On the CPU, one pass of the fused kernel ``deeperlab_d2::class_argmax`` when it is built
    (``use_compiled=None``: when available; True: required; False: never); otherwise, and on
    other devices, :func:`semantic_labels` and a table lookup. Both give the same result.

    Returns:
        ``(labels [N, H, W] int64 (-1 = void), flagged [N, H, W] bool)``.
    """
    C = logits.shape[1]
    if use_compiled is None:
        use_compiled = compiled_op_available(logits.device, "class_argmax")
    elif use_compiled:
        _use_compiled("class_argmax", logits.device, True)
    if use_compiled:
        flags = _class_lut(C, flagged_ids, "cpu")[:C]
        return torch.ops.deeperlab_d2.class_argmax(logits, flags)
    labels = semantic_labels(logits)
    return labels, torch.take(_class_lut(C, flagged_ids, labels.device), labels)


def _autocast_disabled(device: torch.device):
    """Context that turns autocast off for ``device`` (no-op where autocast does not exist)."""
    is_available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    if is_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# sampling helpers
# --------------------------------------------------------------------------------------------
def bilinear_sample(field: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample a multi-channel map at arbitrary points; zero outside the map.

    Args:
        field: [C, H, W].
        ys, xs: [M] float positions (pixels).

    Returns:
        [C, M].
    """
    C, H, W = field.shape
    flat = field.reshape(C, H * W)
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    wy1, wx1 = ys - y0f, xs - x0f
    y0, x0 = y0f.long(), x0f.long()
    out = field.new_zeros(C, ys.numel())
    for dy, wy in ((0, 1 - wy1), (1, wy1)):
        for dx, wx in ((0, 1 - wx1), (1, wx1)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).expand(C, -1)
            w = torch.where(ok, wy * wx, torch.zeros_like(wy))
            out += torch.gather(flat, 1, idx) * w
    return out


# --------------------------------------------------------------------------------------------
# 1. offset refinement
# --------------------------------------------------------------------------------------------
def _gather_pixels(fields: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``fields[..., ys, xs]`` of [..., H, W] fields at T integer pixels: [..., T]. One
    ``index_select`` of flat pixel indices when the fields are contiguous (several times faster
    on the CPU than advanced indexing), advanced indexing otherwise (no copy of a cropped view).
    """
    H, W = fields.shape[-2:]
    if not fields.is_contiguous():
        return fields[..., ys, xs]
    lead = fields.shape[:-2]
    return fields.reshape(-1, H * W).index_select(1, ys * W + xs).view(*lead, ys.numel())


def refine_long_offsets(
    long_offsets: torch.Tensor,
    short_offsets: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Recursive refinement of long-range offsets at chosen pixels of one image.

    ``L_k(x) <- L_k(x) + S_k(x + L_k(x))``, ``steps`` times, bilinear sampling (zero outside
    the image).

    Args:
        long_offsets, short_offsets: [P, 2, H, W].
        ys, xs: [T] integer pixel coordinates where the refined offsets are wanted.
        steps: number of refinement steps (0 = none).

    Returns:
        [P, 2, T] refined long-range offsets at those pixels.
    """
    lo = _gather_pixels(long_offsets, ys, xs)  # [P, 2, T]
    yf, xf = ys.to(lo.dtype)[None], xs.to(lo.dtype)[None]
    for _ in range(steps):
        lo.add_(_sample_planes(short_offsets, yf + lo[:, 0], xf + lo[:, 1]))  # lo is ours
    return lo


def _sample_planes(fields: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of [P, C, H, W] fields, map ``k`` at its own [P, T] points: [P, C, T];
    zero outside the image. The float32 operations of the fused CPU kernel
    (``csrc/postprocess_cpu.cpp``, ``sample_plane``), in the same order: the tap weights
    ``wy * wx`` first, then the taps (0, 0), (0, 1), (1, 0), (1, 1) added to 0 one by one."""
    P, C, H, W = fields.shape
    T = ys.shape[1]
    inside = (ys > -1) & (ys < H) & (xs > -1) & (xs < W)  # NaN fails
    ys, xs = torch.where(inside, ys, 0.0), torch.where(inside, xs, 0.0)
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    wy1, wx1 = ys - y0f, xs - x0f
    y0, x0 = y0f.long(), x0f.long()
    flat = fields.reshape(P, C, H * W)
    out = fields.new_zeros(P, C, T)
    for dy, wy in ((0, 1 - wy1), (1, wy1)):
        for dx, wx in ((0, 1 - wx1), (1, wx1)):
            yy, xx = y0 + dy, x0 + dx
            ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1))[:, None].expand(P, C, T)
            tap = torch.gather(flat, 2, idx) * (wy * wx)[:, None]
            out += torch.where(ok[:, None], tap, 0.0)
    return out


def follow_mid_offsets(
    mid_offsets: torch.Tensor,
    short_offsets: torch.Tensor,
    edge: int,
    ys: torch.Tensor,
    xs: torch.Tensor,
    steps: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where edge ``k -> l`` leads from points near keypoint ``k``, with refined offsets.

    ``M_kl(p) <- M_kl(p) + S_l(p + M_kl(p))`` (``steps`` times), evaluated only at the points.

    Args:
        mid_offsets: [E, 2, H, W]; short_offsets: [P, 2, H, W].
        edge: index into :data:`KEYPOINT_EDGES`.
        ys, xs: [M] float positions.

    Returns:
        (ys', xs'): [M] each, the predicted positions of keypoint ``l``.
    """
    target = KEYPOINT_EDGES[edge][1]
    m = bilinear_sample(mid_offsets[edge], ys, xs)
    for _ in range(steps):
        m = m + bilinear_sample(short_offsets[target], ys + m[0], xs + m[1])
    return ys + m[0], xs + m[1]


# --------------------------------------------------------------------------------------------
# 2. Hough score maps
# --------------------------------------------------------------------------------------------
def hough_score_maps(
    heatmap_probs: torch.Tensor,
    short_offsets: torch.Tensor,
    long_offsets: Optional[torch.Tensor],
    thing_mask: Optional[torch.Tensor],
    cfg: PostProcessConfig,
    long_votes: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused keypoint score maps from short- and long-range Hough votes.

    Short range: every pixel whose keypoint probability is at least ``min_vote_prob`` casts it
    at ``x + S_k(x)`` (the dense Hough-voting op; the others weigh 0 and cast nothing). Long
    range: every thing pixel casts 1 at ``x + L_k(x)``, through the op's sparse entry point
    :func:`~deeperlab_d2.layers.hough_voting.splat_points`: only thing pixels are read, no
    full-size weight map is built. The two differ only in float32 summation order from one
    dense vote over the thing mask.

    Args:
        heatmap_probs: [N, P, H, W] keypoint probabilities (sigmoid of the heatmap logits).
        short_offsets: [N, P, 2, H, W].
        long_offsets: [N, P, 2, H, W], read at the thing pixels (not used with ``long_votes``).
        thing_mask: [N, H, W] bool, pixels predicted as a thing class (not used with
            ``long_votes``).
        cfg: weights ``short_vote_weight``, ``long_vote_weight``, ``min_vote_prob``, ``R``.
        long_votes: optional ``(points [M, 2], map_index [M])``, the long-range votes as
            :func:`long_range_votes` gives them, e.g. with refined offsets
            (:func:`deeperlab_instances`); replaces ``long_offsets`` and ``thing_mask``.

    Returns:
        ``(fused, short)``, both [N, P, H, W]: the fused map
        ``(ws * short_votes + wl * long_votes) / (pi R^2)`` (keypoint localization) and the
        short-range map alone, ``short_votes / (pi R^2)`` (a probability mass: a perfectly
        predicted keypoint whose disk lies inside the image collects 1; the scores).
    """
    short_w = F.threshold(heatmap_probs, _float32_below(cfg.min_vote_prob), 0.0)
    if long_votes is None and cfg.long_vote_weight > 0 and heatmap_probs.shape[0] > 0:
        pixel_keypoints = []
        for n in range(heatmap_probs.shape[0]):
            ys, xs = torch.nonzero(thing_mask[n], as_tuple=True)
            lo = _gather_pixels(long_offsets[n], ys, xs)
            pixel_keypoints.append(_pixel_keypoints(ys, xs, lo))
        long_votes = long_range_votes(pixel_keypoints)
    return _score_maps(short_w, short_offsets, long_votes, cfg)


def _float32_below(value: float) -> float:
    """The largest float32 below ``float32(value)``: for float32 ``x`` (not NaN),
    ``x > it`` <=> ``x >= value`` as torch compares them (``F.threshold``'s strict test)."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(-math.inf)))


def _score_maps(
    short_weights: torch.Tensor,
    short_offsets: torch.Tensor,
    long_votes: Optional[Tuple[torch.Tensor, torch.Tensor]],
    cfg: PostProcessConfig,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # :func:`hough_score_maps` from the thresholded short-range weights [N, P, H, W]: two op
    # calls (dense short, sparse long) and three in-place passes; the same float operations
    # as ``short = votes * norm; fused = short * ws + long * (wl * norm)``
    N, P, H, W = short_weights.shape
    norm = 1.0 / (math.pi * cfg.keypoint_radius**2)
    short = hough_voting(short_offsets, short_weights, (H, W)).mul_(norm)
    ws = cfg.short_vote_weight
    if cfg.long_vote_weight <= 0 or long_votes is None:
        return short * ws, short
    points, map_index = long_votes
    ones = points.new_ones(points.shape[0])
    fused = splat_points(points, ones, map_index, N * P, (H, W)).view(N, P, H, W)
    fused.mul_(cfg.long_vote_weight * norm)
    fused.add_(short if ws == 1 else short * ws)
    return fused, short


def keypoint_votes(
    heatmap_logits: torch.Tensor,
    short_offsets: torch.Tensor,
    long_offsets: torch.Tensor,
    pixels: torch.Tensor,
    cfg: PostProcessConfig,
    use_compiled: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 for one image: the refined keypoints predicted at its thing pixels and the
    Hough score maps (short-range votes from every pixel whose keypoint probability is at
    least ``min_vote_prob``, long-range votes from the thing pixels' refined keypoints).

    On the CPU, one call of the fused kernel ``deeperlab_d2::keypoint_votes`` when it is built
    (two passes over the head outputs: ``use_compiled=None``: when available; True: required;
    False: never); otherwise, and on other devices, :func:`keypoint_votes_reference`, which
    composes :func:`refine_long_offsets` and the Hough-voting ops (on CUDA, their CUDA
    kernels). The two agree to float32 rounding (the sigmoid and the summation order of the
    votes landing on one cell, the kernel scaling each vote's weight before the sum; the
    keypoints are bit-equal).

    Args:
        heatmap_logits: [P, H, W]; short_offsets, long_offsets: [P, 2, H, W]; float32.
        pixels: [T] int64 flat indices ``y * W + x`` of the thing pixels (raster order).
        cfg: ``min_vote_prob``, ``refine_steps``, ``keypoint_radius``, the vote weights.

    Returns:
        ``(fused [P, H, W], short [P, H, W], keypoints [T, P, 2])``: the maps of
        :func:`hough_score_maps` and the keypoints ``(y, x) + L_k`` (refined) of the pixels.
    """
    if use_compiled is None:
        use_compiled = compiled_op_available(heatmap_logits.device, "keypoint_votes")
    elif use_compiled:
        _use_compiled("keypoint_votes", heatmap_logits.device, True)
    if not use_compiled:
        return keypoint_votes_reference(heatmap_logits, short_offsets, long_offsets, pixels, cfg)
    return torch.ops.deeperlab_d2.keypoint_votes(
        heatmap_logits,
        short_offsets,
        long_offsets,
        pixels,
        cfg.min_vote_prob,
        cfg.refine_steps,
        1.0 / (math.pi * cfg.keypoint_radius**2),
        cfg.short_vote_weight,
        cfg.long_vote_weight,
    )


def keypoint_votes_reference(
    heatmap_logits: torch.Tensor,
    short_offsets: torch.Tensor,
    long_offsets: torch.Tensor,
    pixels: torch.Tensor,
    cfg: PostProcessConfig,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`keypoint_votes` in plain PyTorch on any device (the oracle of the fused kernel)."""
    P, H, W = heatmap_logits.shape
    ys, xs = torch.div(pixels, W, rounding_mode="floor"), pixels % W
    lo = refine_long_offsets(long_offsets, short_offsets, ys, xs, cfg.refine_steps)
    by_type = _pixel_keypoints(ys, xs, lo)  # [P, T, 2]: the long-range votes
    short_w = torch.threshold_(heatmap_logits.sigmoid(), _float32_below(cfg.min_vote_prob), 0.0)
    long_votes = long_range_votes([by_type])
    fused, short = _score_maps(short_w[None], short_offsets[None], long_votes, cfg)
    return fused[0], short[0], _transpose_pairs(by_type)


def _pixel_keypoints(ys: torch.Tensor, xs: torch.Tensor, long_offsets: torch.Tensor):
    """[P, T, 2] keypoints ``(y, x) + L_k`` predicted by T pixels from their [P, 2, T] long-range
    offsets (``ys``, ``xs``: [T] integer coordinates)."""
    P, _, T = long_offsets.shape
    kps = long_offsets.new_empty(P, T, 2)
    torch.add(ys.to(kps.dtype)[None], long_offsets[:, 0], out=kps[..., 0])
    torch.add(xs.to(kps.dtype)[None], long_offsets[:, 1], out=kps[..., 1])
    return kps


def _transpose_pairs(kps: torch.Tensor) -> torch.Tensor:
    """[P, T, 2] -> contiguous [T, P, 2], bit for bit: each (y, x) float32 pair moved as one
    64-bit word (a 2-D transpose, several times faster than copying pairs of floats)."""
    P, T, _ = kps.shape
    if kps.dtype != torch.float32 or not kps.is_contiguous() or kps.storage_offset() % 2:
        return kps.transpose(0, 1).contiguous()
    words = kps.view(torch.int64).view(P, T)
    return words.t().contiguous().view(torch.float32).view(T, P, 2)


def long_range_votes(
    pixel_keypoints: Sequence[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The long-range votes of a batch, as :func:`splat_points` takes them.

    Args:
        pixel_keypoints: per image ``n``, [P, T_n, 2] keypoints (y, x) predicted by its T_n
            thing pixels (``x + L_k(x)``), on one device.

    Returns:
        ``points`` [M, 2] and ``map_index`` [M] int64 (``n * P + k``), M = P * sum T_n, sorted
        by map then by pixel (the split of the op's CPU kernel over threads needs sorted maps).
    """
    P = pixel_keypoints[0].shape[0]
    device = pixel_keypoints[0].device
    if len(pixel_keypoints) == 1:
        points = pixel_keypoints[0].reshape(-1, 2)
    else:
        points = torch.cat([kps.reshape(-1, 2) for kps in pixel_keypoints])
    counts = torch.tensor([kps.shape[1] for kps in pixel_keypoints]).repeat_interleave(P)
    map_index = torch.repeat_interleave(
        torch.arange(counts.numel(), device=device),
        counts.to(device),
        output_size=points.shape[0],
    )
    return points, map_index


# --------------------------------------------------------------------------------------------
# 3. keypoints
# --------------------------------------------------------------------------------------------
# px: same-type keypoint hypotheses closer than this share one cell (:func:`support_scores`)
SHARED_CELL = 0.5


def expected_oks_scores(
    score_map: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, sigma: float, clip: bool = True
) -> torch.Tensor:
    """Expected-OKS vote mass of keypoint hypotheses: the map weighted by the OKS kernel
    ``exp(-|q - p|^2 / (2 sigma^2))`` over the cells ``q`` within ``3 sigma`` of ``p``.

    On the fused map it grows with the instance's area (its pixels' long-range votes): it
    orders the greedy queue (:func:`find_keypoints`) and is no score; the scores are
    :func:`support_scores`.

    Args:
        score_map: [H, W] map of one keypoint type.
        ys, xs: [M] float positions.
        sigma: OKS kernel width (px).
        clip: clip to [0, 1].

    Returns:
        [M] masses (>= 0; in [0, 1] with ``clip``).
    """
    H, W = score_map.shape
    r = max(1, int(math.ceil(3 * sigma)))
    d = torch.arange(-r, r + 1, device=score_map.device)
    cy, cx = torch.round(ys).long(), torch.round(xs).long()
    qy = cy[:, None, None] + d[None, :, None]  # [M, 2r+1, 1]
    qx = cx[:, None, None] + d[None, None, :]  # [M, 1, 2r+1]
    ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    vals = score_map[qy.clamp(0, H - 1), qx.clamp(0, W - 1)] * ok
    d2 = (qy - ys[:, None, None]) ** 2 + (qx - xs[:, None, None]) ** 2
    kernel = torch.exp(-d2 / (2 * sigma**2))
    out = (vals * kernel).flatten(1).sum(1)
    return out.clamp(max=1.0) if clip else out


def _expected_oks_typed(
    maps: torch.Tensor, types: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, sigma: float
) -> torch.Tensor:
    """:func:`expected_oks_scores` (not clipped) of hypotheses of several keypoint types, each
    on the map of its type (``maps[types[m]]``, [P, H, W] maps), in one batch: the same float32
    operations, value for value."""
    H, W = maps.shape[-2:]
    r = max(1, int(math.ceil(3 * sigma)))
    d = torch.arange(-r, r + 1, device=maps.device)
    cy, cx = torch.round(ys).long(), torch.round(xs).long()
    qy = cy[:, None, None] + d[None, :, None]  # [M, 2r+1, 1]
    qx = cx[:, None, None] + d[None, None, :]  # [M, 1, 2r+1]
    ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    vals = maps[types[:, None, None], qy.clamp(0, H - 1), qx.clamp(0, W - 1)] * ok
    d2 = (qy - ys[:, None, None]) ** 2 + (qx - xs[:, None, None]) ** 2
    kernel = torch.exp(-d2 / (2 * sigma**2))
    return (vals * kernel).flatten(1).sum(1)


def _distances(pos: torch.Tensor, types: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, M] Euclidean distances between the rows of ``pos`` (the same direct computation
    whatever M: no ``|a|^2 - 2 a.b + |b|^2`` expansion), ``inf`` between different ``types``."""
    dist = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")
    if types is not None:
        dist.masked_fill_(types[:, None] != types[None], math.inf)
    return dist


def support_scores(
    short_map: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    radius: float,
    sigma: float,
    return_spread: bool = False,
    types: Optional[torch.Tensor] = None,
):
    """How well the short-range votes support keypoint hypotheses of one type: a score in
    [0, 1] that does not grow with the instance's area nor shrink in a crowd.

    Each hypothesis ``p`` owns its *cell*: the pixels within ``radius`` of it that are not
    nearer to another of the hypotheses (:func:`cell_areas`; hypotheses closer than 1/2 px
    to each other share one cell, so that coinciding keypoints of two instances both own it).
    A perfect model makes exactly these pixels vote for ``p``, with probability 1 (the targets'
    disks, split between same-type keypoints by nearest keypoint). Score = expected-OKS vote
    mass in the cell (the short-range map weighted by ``exp(-|q - p|^2 / (2 sigma^2))``, within
    ``3 sigma``) / max(number of pixels of the cell, vote mass in the cell within ``3 sigma``):
    the mean over the cell's pixels of probability x OKS of their votes. It is ~1 for a
    perfect keypoint, whether its instance has 4 or 40 000 pixels, stands alone or among
    others 3 px away, or is cut by the image border; lower probabilities and scattered votes
    lower it; a few stray votes in a large empty cell score ~0. Never above 1 (the kernel is at
    most 1): nothing is clipped. (A cell smaller than the votes it receives, when a spurious
    hypothesis splits a keypoint's votes, scores their concentration around ``p``.)

    Hypotheses of several keypoint types are scored in one call with ``types``: each on its
    type's map, cells split among hypotheses of the same type only; value for value what one
    call per type gives.

    Args:
        short_map: [H, W] short-range map of one keypoint type (probability-weighted votes
            divided by ``pi radius^2``, see :func:`hough_score_maps`); with ``types``, the
            [P, H, W] maps of every type.
        ys, xs: [M] float positions of the hypotheses (all of them: they split the cells).
        radius: R, the disk radius of the targets (px).
        sigma: OKS kernel width (px).
        return_spread: also return the spread of the votes.
        types: optional [M] int64 keypoint type of each hypothesis (an index into
            ``short_map``'s first dimension).

    Returns:
        [M] scores in [0, 1]; with ``return_spread``, also [M] spreads: the root mean square
        distance (px) from each hypothesis of the votes in its cell within ``3 sigma`` (0
        without votes), its localization uncertainty.
    """
    H, W = short_map.shape[-2:]
    M = ys.numel()
    if M == 0:
        return (short_map.new_zeros(0),) * 2 if return_spread else short_map.new_zeros(0)
    device = short_map.device
    maps = short_map.reshape(-1, H * W)
    pos = torch.stack([ys, xs], 1).double()
    # hypotheses (of one type) closer than 1/2 px form one group, represented by the first
    rep = (_distances(pos, types) < SHARED_CELL).to(torch.uint8).argmax(1)
    is_rep = rep == torch.arange(M, device=device)
    group = (torch.cumsum(is_rep, 0) - 1)[rep]
    centers = pos[is_rep]
    ctypes = None if types is None else types[is_rep]
    capacity = cell_areas(centers, radius, (H, W), ctypes)[group].to(short_map.dtype)

    # vote mass within 3 sigma of each hypothesis, in its group's cell: a pixel is in the cell
    # of the group nearest to it (ties shared); the groups' windows cover every pixel within
    # 3 sigma + 1/2 px of a hypothesis
    rho = 3.0 * sigma
    r = int(math.ceil(rho)) + 2
    d = torch.arange(-r, r + 1, device=device)
    cy, cx = centers[:, 0].float(), centers[:, 1].float()
    gy = (torch.round(cy).long()[:, None] + d)[:, :, None].expand(-1, -1, d.numel()).flatten(1)
    gx = (torch.round(cx).long()[:, None] + d)[:, None, :].expand(-1, d.numel(), -1).flatten(1)
    inside = (gy >= 0) & (gy < H) & (gx >= 0) & (gx < W)  # [G, S]
    flat = gy.clamp(0, H - 1) * W + gx.clamp(0, W - 1)
    if ctypes is not None:
        flat = flat + ctypes[:, None] * (H * W)
    own = inside
    # only groups with another one (of their type) nearby contest pixels: nearest group of
    # each pixel of their windows, on the bounding box of those windows (one per type)
    between = _distances(centers, ctypes).fill_diagonal_(math.inf)
    contested = torch.nonzero((between < 2 * rho + 4).any(1)).flatten()
    if contested.numel():
        ky, kx = gy[contested].clamp(0, H - 1), gx[contested].clamp(0, W - 1)
        y0, x0 = int(ky.min()), int(kx.min())
        bh, bw = int(ky.max()) - y0 + 1, int(kx.max()) - x0 + 1
        local = (ky - y0) * bw + (kx - x0)
        layers = 1
        if ctypes is not None:
            kt = ctypes[contested]
            kt_min = int(kt.min())
            layers = int(kt.max()) - kt_min + 1
            local = local + (kt - kt_min)[:, None] * (bh * bw)
        dist = torch.hypot(ky - cy[contested, None], kx - cx[contested, None])
        ins = inside[contested]
        nearest = dist.new_full((layers * bh * bw,), math.inf)
        nearest.scatter_reduce_(0, local[ins], dist[ins], "amin")
        own = inside.clone()
        own[contested] = ins & (dist <= nearest[local] + 1e-3)
    qy, qx = gy, gx
    if centers.shape[0] < M:  # per hypothesis: its group's window, its own kernel
        flat, own, qy, qx = flat[group], own[group], qy[group], qx[group]
    d2 = (qy - ys[:, None]) ** 2 + (qx - xs[:, None]) ** 2
    near = own & (d2 <= rho * rho)
    mass = maps.reshape(-1)[flat] * near
    oks_mass = (mass * torch.exp(-d2 / (2 * sigma**2))).sum(1)
    cells = capacity / (math.pi * radius * radius)  # in map units
    total = mass.sum(1)
    scores = oks_mass / torch.maximum(cells, total).clamp(min=1e-12)
    if not return_spread:
        return scores
    return scores, ((mass * d2).sum(1) / total.clamp(min=1e-12)).sqrt()


def cell_areas(
    centers: torch.Tensor,
    radius: float,
    size: Tuple[int, int],
    types: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Number of pixels of each keypoint's cell: the pixels ``q`` of an ``H x W`` image with
    ``|q - c| <= radius`` and ``|q - c| <= |q - c'|`` for every other center ``c'`` (pixels on a
    bisector belong to both), counted row by row: in each row the cell is an interval, the disk's
    chord cut by the half-planes of the neighbours. Only the 16 nearest neighbours are tried
    first; a center whose cell some farther neighbour may still cut (half its distance within
    the cell's extent) is redone with all neighbours closer than ``2 radius``.

    Args:
        centers: [G, 2] (y, x), distinct (among those of one type).
        radius: px; size: (H, W).
        types: optional [G] int64: centers of different types never cut each other's cells
            (the cells of several keypoint types in one call).

    Returns:
        [G] float64 pixel counts.
    """
    H, W = size
    centers = centers.double()
    G = centers.shape[0]
    dist = _distances(centers, types)
    dist.fill_diagonal_(float("inf"))
    k = min(16, G - 1)
    near_d, near = dist.topk(k, 1, largest=False) if k > 0 else (dist[:, :0], dist[:, :0].long())
    pm = torch.arange(G, device=centers.device)[:, None].expand(-1, k).flatten()
    pn, pd = near.flatten(), near_d.flatten()
    keep = pd < 2 * radius
    count, extent = _cell_rows(centers, radius, (H, W), pm[keep], pn[keep])
    # a farther neighbour cuts the cell only if half its distance is within the cell's extent
    far = (dist < 2 * radius) & (dist / 2 <= extent[:, None])
    far[torch.arange(G, device=centers.device)[:, None], near] = False
    redo = torch.nonzero(far.any(1)).flatten()
    if redo.numel():
        rm, rn = torch.nonzero(dist[redo] < 2 * radius, as_tuple=True)
        count[redo] = _cell_rows(centers, radius, (H, W), redo[rm], rn, redo)[0]
    return count


def _cell_rows(centers, radius, size, pm, pn, which=None):
    # :func:`cell_areas` of the centers ``which`` (default all) cut by the half-planes of the
    # pairs (pm, pn) (pm in ``which``): pixel counts and the largest distance from a center to
    # a pixel center of its cell (its extent)
    H, W = size
    if which is None:
        which = torch.arange(centers.shape[0], device=centers.device)
    slot = torch.full((centers.shape[0],), -1, dtype=torch.long, device=centers.device)
    slot[which] = torch.arange(which.numel(), device=centers.device)
    r = int(math.ceil(radius))
    cy, cx = centers[:, 0], centers[:, 1]
    rows = torch.round(cy[which])[:, None] + torch.arange(-r, r + 1, device=centers.device)
    dy = rows - cy[which, None]  # [G', L]
    half2 = radius * radius - dy * dy
    ok = (half2 >= 0) & (rows >= 0) & (rows <= H - 1)
    hi = half2.clamp(min=0).sqrt()  # bounds of u = qx - cx in each row
    lo = -hi
    if pm.numel():
        # |q - c_m| <= |q - c_n|  <=>  a u + c dy <= (a^2 + c^2) / 2, (c, a) = c_n - c_m
        a = (cx[pn] - cx[pm])[:, None]
        c = (cy[pn] - cy[pm])[:, None]
        rhs = (a * a + c * c) / 2 - c * dy[slot[pm]] + 1e-9
        bound = rhs / a.masked_fill(a == 0, 1.0)
        upper = bound.masked_fill(a <= 0, math.inf)
        upper.masked_fill_((a == 0) & (rhs < 0), -math.inf)  # the row is on the far side
        lower = bound.masked_fill(a >= 0, -math.inf)
        hi = torch.minimum(hi, _group_reduce(upper, slot[pm], hi.shape[0], math.inf, "amin"))
        lo = torch.maximum(lo, _group_reduce(lower, slot[pm], lo.shape[0], -math.inf, "amax"))
    x0 = torch.ceil(cx[which, None] + lo - 1e-9).clamp(min=0)
    x1 = torch.floor(cx[which, None] + hi + 1e-9).clamp(max=W - 1)
    n = (x1 - x0 + 1).clamp(min=0) * ok
    u = torch.maximum((x0 - cx[which, None]).abs(), (x1 - cx[which, None]).abs())
    extent = torch.where(n > 0, torch.hypot(u, dy), 0.0).amax(1)
    return n.sum(1), extent


def _group_reduce(values: torch.Tensor, group: torch.Tensor, num_groups: int, fill: float, how):
    """Per-group ``amin`` / ``amax`` of the rows of [E, L] ``values`` (row e in group
    ``group[e]``): [num_groups, L], ``fill`` for an empty group. The rows are laid out in a
    padded [num_groups, largest group, L] tensor and reduced along dim 1 (the same values as
    ``scatter_reduce``, which is slow on the CPU)."""
    E, L = values.shape
    if E == 0:
        return values.new_full((num_groups, L), fill)
    order = group.argsort(stable=True)
    g = group[order]
    counts = torch.bincount(g, minlength=num_groups)
    rank = torch.arange(E, device=g.device) - (torch.cumsum(counts, 0) - counts)[g]
    dense = values.new_full((num_groups, int(counts.max()), L), fill)
    dense[g, rank] = values[order]
    return dense.amin(1) if how == "amin" else dense.amax(1)


def window_max(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over a ``kernel`` x ``kernel`` window centered on each cell ([..., H, W] maps).

    Same result as ``F.max_pool2d(maps, kernel, 1, kernel // 2)``, computed separably with
    shifted maxima (``max_pool2d`` with stride 1 is very slow on CPU).
    """
    r = kernel // 2
    out = maps
    for dim in (-1, -2):
        size = maps.shape[dim]
        acc = out.clone()
        for d in range(1, min(r, size - 1) + 1):
            a = acc.narrow(dim, 0, size - d)
            torch.maximum(a, out.narrow(dim, d, size - d), out=a)
            b = acc.narrow(dim, d, size - d)
            torch.maximum(b, out.narrow(dim, 0, size - d), out=b)
        out = acc
    return out


def find_keypoints(
    score_maps: torch.Tensor, cfg: PostProcessConfig, short_maps: Optional[torch.Tensor] = None
) -> List[Dict[str, torch.Tensor]]:
    """Keypoint candidates: local maxima of the fused maps, sub-pixel refined, scored on the
    short-range maps.

    Args:
        score_maps: [N, P, H, W] fused score maps (short + long votes: localization).
        cfg: ``peak_kernel``, ``peak_threshold``, ``max_keypoints``, ``keypoint_radius``,
            ``oks_sigma``, ``keypoint_threshold``.
        short_maps: [N, P, H, W] short-range maps (the scores, :func:`support_scores` with the
            candidates of the same image and type as hypotheses); default ``score_maps``.

    Returns:
        per image, a dict of [M] tensors: ``type`` (keypoint index), ``y``, ``x`` (float
        positions), ``score`` (support score, :func:`support_scores`), ``spread`` (px, the
        spread of their votes), ``mass`` (expected-OKS mass of the fused map, not clipped:
        :func:`expected_oks_scores`). A candidate has ``score`` or ``mass`` >=
        ``keypoint_threshold``; they are sorted by decreasing ``mass`` (the greedy queue's
        order: the keypoints with the most votes first, as in the paper).
    """
    if short_maps is None:
        short_maps = score_maps
    N, P, H, W = score_maps.shape
    # peaks are sparse: take them all, then keep the max_keypoints best of each (image, type)
    n_idx, k_idx, y_idx, x_idx = local_peaks(score_maps, cfg.peak_kernel, cfg.peak_threshold)
    vals = score_maps[n_idx, k_idx, y_idx, x_idx]
    order = vals.argsort(descending=True, stable=True)
    group = (n_idx * P + k_idx)[order]
    order = order[group.argsort(stable=True)]  # grouped by (image, type), best first
    group = (n_idx * P + k_idx)[order]
    counts = torch.bincount(group, minlength=N * P)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=group.device) - starts[group]
    order = order[rank < cfg.max_keypoints]
    n_idx, k_idx, y_idx, x_idx = n_idx[order], k_idx[order], y_idx[order], x_idx[order]
    results = []
    for n in range(N):
        sel = n_idx == n
        types, py, px = k_idx[sel], y_idx[sel], x_idx[sel]
        ys, xs = _subpixel(score_maps[n], types, py, px)
        # every type in one call (cells split among the candidates of a type)
        scores, spread = support_scores(
            short_maps[n], ys, xs, cfg.keypoint_radius, cfg.oks_sigma, True, types
        )
        # every type in one batch (the values of expected_oks_scores on each type's map)
        mass = _expected_oks_typed(score_maps[n], types, ys, xs, cfg.oks_sigma)
        # candidates: supported by their own short-range votes (support score) or by the fused
        # votes (expected-OKS mass of short + long votes: the instance's pixels agree on it);
        # the greedy queue takes the most voted first
        order = torch.nonzero(
            (scores >= cfg.keypoint_threshold) | (mass >= cfg.keypoint_threshold)
        ).flatten()
        order = order[mass[order].argsort(descending=True, stable=True)]
        types, ys, xs, scores, spread, mass = (
            v[order] for v in (types, ys, xs, scores, spread, mass)
        )
        # a plateau (e.g. a keypoint exactly between cells) gives several equal maxima with the
        # same sub-pixel position: keep the first of same-type candidates closer than 1 px
        d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
        dup = (
            (d2 < 1.0)
            & (types[:, None] == types[None])
            & torch.ones_like(d2, dtype=torch.bool).tril(-1)
        )
        keep = ~dup.any(1)
        results.append(
            {
                "type": types[keep],
                "y": ys[keep],
                "x": xs[keep],
                "score": scores[keep],
                "spread": spread[keep],
                "mass": mass[keep],
            }
        )
    return results


#: (dy, dx) of the 8 neighbours of a cell
_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def local_peaks(
    maps: torch.Tensor, kernel: int, threshold: float, ridge: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local maxima of [N, P, H, W] maps: cells above ``threshold`` that are the maximum of
    their 3 x 3 neighbourhood and of their ``kernel`` x ``kernel`` window, except where a
    higher cell of the window is a separate peak: the cells between the two (on the segment
    joining them) fall below ``ridge`` x the cell's value somewhere. A ripple of one vote
    cloud is suppressed; the keypoints of two instances 2 px apart, each with its own votes,
    are both kept. Ties are kept (a plateau: the sub-pixel refinement merges them).

    Returns:
        ``(n, k, y, x)`` int64 indices of the peaks (``torch.nonzero`` order).
    """
    N, P, H, W = maps.shape
    n, k, y, x = _cells_above(maps, threshold)
    flat = maps.reshape(N * P, H * W)
    plane = n * P + k
    v = flat[plane, y * W + x]
    # the maximum of the 3 x 3 neighbourhood (ties kept), read at the sparse cells only: the
    # 8 neighbours at once, [8, n]
    d = torch.tensor(_NEIGHBOURS_8, device=maps.device)
    qy, qx = y + d[:, :1], x + d[:, 1:]
    ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    q = torch.take(flat, plane * (H * W) + qy.clamp(0, H - 1) * W + qx.clamp(0, W - 1))
    is_max = (~ok | (v >= q)).all(0)
    n, k, y, x, plane, v = n[is_max], k[is_max], y[is_max], x[is_max], plane[is_max], v[is_max]
    r = kernel // 2
    if r < 2 or n.numel() == 0:
        return n, k, y, x

    def value(fy, fx):
        # max of the cells a (fractional) point rounds to; 0 outside the maps
        out = torch.zeros_like(v)
        for yy in {math.floor(fy), math.ceil(fy)}:
            for xx in {math.floor(fx), math.ceil(fx)}:
                qy, qx = y + yy, x + xx
                ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
                q = flat[plane, qy.clamp(0, H - 1) * W + qx.clamp(0, W - 1)]
                out = torch.maximum(out, torch.where(ok, q, 0.0))
        return out

    keep = torch.ones_like(v, dtype=torch.bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            steps = max(abs(dy), abs(dx))
            if steps < 2:
                continue
            higher = value(dy, dx) > v
            if not higher.any():
                continue
            ridge_min = torch.full_like(v, math.inf)
            for i in range(1, steps):
                ridge_min = torch.minimum(ridge_min, value(dy * i / steps, dx * i / steps))
            keep &= ~(higher & (ridge_min >= ridge * v))
    return n[keep], k[keep], y[keep], x[keep]


def _cells_above(maps: torch.Tensor, threshold: float, use_compiled: Optional[bool] = None):
    """``torch.nonzero(maps > threshold, as_tuple=True)`` of [N, P, H, W] maps (same order),
    for sparse maps: only the rows whose maximum exceeds the threshold are searched (one
    vectorized pass over the maps instead of a full-size mask and its scan; a row holding a NaN
    is skipped, as its maximum is NaN). On the CPU (float32 maps), that pass is one call of the
    compiled ``deeperlab_d2::cells_above`` when it is built (``use_compiled``: None = when
    available, False = never); the result is the same."""
    N, P, H, W = maps.shape
    if use_compiled is None:
        use_compiled = _cpu_kernel("cells_above", maps) and maps.dtype == torch.float32
    if use_compiled:
        flat = torch.ops.deeperlab_d2.cells_above(maps, threshold)
        row, x = torch.div(flat, W, rounding_mode="floor"), flat % W
    else:
        rows = maps.reshape(N * P * H, W)
        hit = torch.nonzero(rows.amax(1) > threshold).flatten() if W else rows.new_zeros(0).long()
        r, x = torch.nonzero(rows[hit] > threshold, as_tuple=True)
        row = hit[r]
    y = row % H
    plane = torch.div(row, H, rounding_mode="floor")
    return torch.div(plane, P, rounding_mode="floor"), plane % P, y, x


def _subpixel(maps: torch.Tensor, types, py, px):
    """Weighted mean position of the 3x3 neighbourhood of each peak ([P, H, W] maps)."""
    P, H, W = maps.shape
    d = torch.arange(-1, 2, device=maps.device)
    qy = (py[:, None, None] + d[None, :, None]).expand(-1, 3, 3)
    qx = (px[:, None, None] + d[None, None, :]).expand(-1, 3, 3)
    ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    v = maps[types[:, None, None].expand(-1, 3, 3), qy.clamp(0, H - 1), qx.clamp(0, W - 1)] * ok
    total = v.flatten(1).sum(1).clamp(min=1e-12)
    ys = (v * qy).flatten(1).sum(1) / total
    xs = (v * qx).flatten(1).sum(1) / total
    return ys, xs


# --------------------------------------------------------------------------------------------
# 4. instances
# --------------------------------------------------------------------------------------------
def propose_instances(
    candidates: Dict[str, torch.Tensor],
    mid_offsets: torch.Tensor,
    short_offsets: torch.Tensor,
    steps: int,
    pixel_keypoints: Optional[torch.Tensor] = None,
    tolerance: float = float("inf"),
) -> torch.Tensor:
    """The instance each keypoint candidate would start, following the star graph.

    From a center candidate, each corner is ``c + M_{c->corner}(c)``; from a corner candidate
    ``q``, the center is ``q + M_{q->c}(q)`` and the other corners follow from that center.

    Where two instances share a center (a disc in a ring's hole, a square in a frame), the
    center's offsets point at one instance's corners, or at a mix of both. A corner
    candidate's walk is suspect when it does not come back (the center's offset to its type
    lands more than ``tolerance`` px from ``q``) or when the bilinear taps of the offsets it
    reads disagree by more than ``tolerance`` px (the point lies between two instances'
    disks, :func:`_tap_spread`). A suspect corner is checked against its own pixels: those
    whose predicted keypoint of its type lies within 1 px of ``q`` (the instance's pixels)
    predict, on average, the instance's keypoints (:func:`_keypoints_from_pixels`); where a
    keypoint of the middle-range proposal lies more than ``tolerance`` px from theirs, the
    proposal is theirs.

    Args:
        candidates: output of :func:`find_keypoints` for one image (M candidates).
        mid_offsets: [E, 2, H, W]; short_offsets: [P, 2, H, W] of that image.
        steps: refinement steps of the middle-range offsets.
        pixel_keypoints: [T, P, 2] keypoints predicted at the image's thing pixels
            (``x + L_k(x)``, refined), or None (no check).
        tolerance: px, the disagreements above which a corner's walk is suspect and its
            proposal is taken from its pixels.

    Returns:
        [M, P, 2] proposed keypoints (y, x) per candidate.
    """
    types, ys, xs = candidates["type"], candidates["y"], candidates["x"]
    M = ys.numel()
    kps = ys.new_zeros(M, NUM_KEYPOINTS, 2)
    corners = torch.arange(4, device=ys.device)[:, None]
    to_center = [KEYPOINT_EDGES.index((k, CENTER)) for k in range(4)]
    from_center = [KEYPOINT_EDGES.index((CENTER, k)) for k in range(4)]
    # corner candidates walk to the center (the 4 edges sampled at every candidate, one batch;
    # each candidate keeps the walk of its own type)
    wy, wx = _follow_mid_offsets_rows(
        mid_offsets, short_offsets, to_center, ys.expand(4, M), xs.expand(4, M), steps
    )
    own = types[None] == corners  # [4, M]: candidate m is a corner of type k
    cy, cx = ys.clone(), xs.clone()
    for k in range(4):
        cy = torch.where(own[k], wy[k], cy)
        cx = torch.where(own[k], wx[k], cx)
    kps[:, CENTER, 0], kps[:, CENTER, 1] = cy, cx
    check = pixel_keypoints is not None and pixel_keypoints.shape[0] > 0
    # every candidate: from the center to each corner (a corner candidate keeps its own
    # position)
    ky, kx = _follow_mid_offsets_rows(
        mid_offsets, short_offsets, from_center, cy.expand(4, M), cx.expand(4, M), steps
    )
    kps[:, :4, 0] = torch.where(own, ys[None], ky).T
    kps[:, :4, 1] = torch.where(own, xs[None], kx).T
    suspect = torch.zeros(M, dtype=torch.bool, device=ys.device)
    if check:
        back = own & (torch.hypot(ky - ys[None], kx - xs[None]) > tolerance)
        spread = _tap_spread_rows(mid_offsets, from_center, cy.expand(4, M), cx.expand(4, M))
        back_spread = _tap_spread_rows(mid_offsets, to_center, ys.expand(4, M), xs.expand(4, M))
        spread = torch.where(own, torch.maximum(spread, back_spread), spread)
        suspect = (back | (spread > tolerance)).any(0)
    suspect = torch.nonzero(suspect & (types < CENTER)).flatten()
    if suspect.numel() > 0:
        est, found = _keypoints_from_pixels(
            pixel_keypoints, types[suspect], ys[suspect], xs[suspect], short_offsets.shape[-2:]
        )
        rows = torch.arange(suspect.numel(), device=est.device)
        est[rows, types[suspect]] = kps[suspect, types[suspect]]
        off = found & ((est - kps[suspect]).norm(dim=-1).amax(1) > tolerance)
        kps[suspect[off]] = est[off]
    return kps


def _plane_bases(fields: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    # [R, C] flat offsets of the planes of fields[rows[r]] ([K, C, H, W] fields) in their
    # contiguous storage
    K, C, H, W = fields.shape
    r = torch.tensor(list(rows), dtype=torch.long, device=fields.device)
    return (r[:, None] * C + torch.arange(C, device=fields.device)) * (H * W)


def _bilinear_taps(ys: torch.Tensor, xs: torch.Tensor, H: int, W: int):
    """The 4 bilinear taps of the points ``ys``, ``xs`` (float tensors of one shape S), stacked
    on a new first dimension in the order (0,0), (0,1), (1,0), (1,1): integer coordinates
    ``yy``, ``xx``, weight factors ``wy``, ``wx`` (``1 - f`` / ``f`` of the fractional parts,
    the values :func:`bilinear_sample` computes) and whether the tap is in the ``H x W`` map;
    [4, *S] each."""
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    fy, fx = ys - y0f, xs - x0f
    gy, gx = 1 - fy, 1 - fx
    y0, x0 = y0f.long(), x0f.long()
    y1, x1 = y0 + 1, x0 + 1
    yy, xx = torch.stack([y0, y0, y1, y1]), torch.stack([x0, x1, x0, x1])
    wy, wx = torch.stack([gy, gy, fy, fy]), torch.stack([gx, fx, gx, fx])
    ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    return yy, xx, wy, wx, ok


def _bilinear_sample_rows(fields, rows, ys, xs):
    """:func:`bilinear_sample` of ``fields[rows[r]]`` ([K, C, H, W] fields) at its own points
    ``ys[r]``, ``xs[r]`` ([R, M] each), for every row r in one batch: [R, C, M]. Each value is
    computed with the float32 operations of :func:`bilinear_sample`, in the same order (the
    four taps' products are formed at once, then added to 0 one by one)."""
    K, C, H, W = fields.shape
    base = _plane_bases(fields, rows)[:, :, None]  # [R, C, 1]
    yy, xx, wy, wx, ok = _bilinear_taps(ys, xs, H, W)  # [4, R, M]
    idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1))[:, :, None]  # [4, R, 1, M]
    w = torch.where(ok, wy * wx, 0.0)[:, :, None]
    taps = torch.take(fields, base + idx) * w  # [4, R, C, M]
    out = fields.new_zeros(ys.shape[0], C, ys.shape[1])
    for t in range(4):
        out += taps[t]
    return out


def _follow_mid_offsets_rows(mid_offsets, short_offsets, edges, ys, xs, steps):
    """:func:`follow_mid_offsets` along ``edges[r]`` from the points ``ys[r]``, ``xs[r]`` ([R, M]
    each) for every row r in one batch (the same values): ``(ys', xs')``, [R, M] each."""
    if not (mid_offsets.is_contiguous() and short_offsets.is_contiguous()):
        walks = [
            follow_mid_offsets(mid_offsets, short_offsets, e, ys[r], xs[r], steps)
            for r, e in enumerate(edges)
        ]
        return torch.stack([w[0] for w in walks]), torch.stack([w[1] for w in walks])
    targets = [KEYPOINT_EDGES[e][1] for e in edges]
    m = _bilinear_sample_rows(mid_offsets, edges, ys, xs)
    for _ in range(steps):
        m = m + _bilinear_sample_rows(short_offsets, targets, ys + m[:, 0], xs + m[:, 1])
    return ys + m[:, 0], xs + m[:, 1]


def _tap_spread_rows(mid_offsets, edges, ys, xs):
    """:func:`_tap_spread` of ``mid_offsets[edges[r]]`` at ``ys[r]``, ``xs[r]`` ([R, M] each)
    for every row r in one batch (the same values): [R, M]."""
    if not mid_offsets.is_contiguous():
        return torch.stack([_tap_spread(mid_offsets[e], ys[r], xs[r]) for r, e in enumerate(edges)])
    E, _, H, W = mid_offsets.shape
    base = _plane_bases(mid_offsets, edges)  # [R, 2]
    yy, xx, wy, wx, ok = _bilinear_taps(ys, xs, H, W)  # [4, R, M]
    ok &= wy * wx > 0.01
    idx = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)
    oy = torch.take(mid_offsets, base[:, 0, None] + idx)
    ox = torch.take(mid_offsets, base[:, 1, None] + idx)
    t = torch.stack([yy + oy, xx + ox], -1)  # [4, R, M, 2]
    w = ok.to(t.dtype)[..., None]
    mean = (t * w).sum(0) / w.sum(0).clamp(min=1)
    return torch.where(ok, (t - mean).norm(dim=-1), 0.0).amax(0)


def _tap_spread(offsets: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """How much the bilinear taps of an offset field disagree at given points.

    Args:
        offsets: [2, H, W] (dy, dx) field; ys, xs: [M] float positions.

    Returns:
        [M]: the largest distance from the mean of the targets ``tap + offsets(tap)`` of the
        in-image taps weighing more than 1 % to one of them (0 where they agree, as inside one
        instance's disk; large where the point lies between two instances' disks).
    """
    H, W = offsets.shape[-2:]
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    fy, fx = ys - y0f, xs - x0f
    y0, x0 = y0f.long(), x0f.long()
    targets, oks = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W) & (wy * wx > 0.01)
            o = offsets[:, yy.clamp(0, H - 1), xx.clamp(0, W - 1)]
            targets.append(torch.stack([yy + o[0], xx + o[1]], -1))
            oks.append(ok)
    t, ok = torch.stack(targets), torch.stack(oks)  # [4, M, 2], [4, M]
    w = ok.to(t.dtype)[..., None]
    mean = (t * w).sum(0) / w.sum(0).clamp(min=1)
    return torch.where(ok, (t - mean).norm(dim=-1), 0.0).amax(0)


def _keypoints_from_pixels(
    pixel_keypoints: torch.Tensor,
    types: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    size: Tuple[int, int],
    radius: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean keypoints predicted by the pixels that vote for given keypoints.

    For query ``m`` (keypoint type ``types[m]`` at ``(ys[m], xs[m])``): the mean of
    ``pixel_keypoints`` over the pixels whose predicted keypoint of that type lies within
    ``radius`` px of it (the instance's own pixels). A lookup table over the image's cells
    makes it O(T) per type, whatever the number of queries (a cell near two same-type queries
    goes to one of them).

    Args:
        pixel_keypoints: [T, P, 2]; types, ys, xs: [F]; size: (H, W) of the image.

    Returns:
        ([F, P, 2] mean keypoints, [F] bool: the query has pixels).
    """
    H, W = size
    F_ = ys.numel()
    device = pixel_keypoints.device
    sums = pixel_keypoints.new_zeros(F_, NUM_KEYPOINTS * 2)
    counts = pixel_keypoints.new_zeros(F_)
    d = torch.arange(-int(math.ceil(radius)), int(math.ceil(radius)) + 1, device=device)
    flat_kps = pixel_keypoints.reshape(-1, NUM_KEYPOINTS * 2)
    for k in types.unique().tolist():
        q = torch.nonzero(types == k).flatten()
        # cells around each query -> query index (-1: none)
        lut = torch.full((H * W,), -1, dtype=torch.long, device=device)
        cy = (torch.round(ys[q]).long()[:, None, None] + d[None, :, None]).expand(-1, -1, d.numel())
        cx = (torch.round(xs[q]).long()[:, None, None] + d[None, None, :]).expand(-1, d.numel(), -1)
        ok = (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
        owner = q[:, None, None].expand_as(cy)
        lut[(cy * W + cx)[ok]] = owner[ok]
        vy, vx = pixel_keypoints[:, k, 0], pixel_keypoints[:, k, 1]
        ry, rx = torch.round(vy).long(), torch.round(vx).long()
        inside = (ry >= 0) & (ry < H) & (rx >= 0) & (rx < W)
        m = torch.where(inside, lut[(ry.clamp(0, H - 1) * W + rx.clamp(0, W - 1))], -1)
        sel = torch.nonzero(m >= 0).flatten()
        m = m[sel]
        near = torch.hypot(vy[sel] - ys[m], vx[sel] - xs[m]) <= radius
        sel, m = sel[near], m[near]
        sums.index_add_(0, m, flat_kps[sel])
        counts.index_add_(0, m, torch.ones_like(m, dtype=counts.dtype))
    found = counts > 0
    mean = sums / counts.clamp(min=1)[:, None]
    return mean.view(F_, NUM_KEYPOINTS, 2), found


def rejection_radii(keypoints: torch.Tensor, max_radius: float) -> torch.Tensor:
    """[J, P, 2] instance keypoints -> [J, P] keypoint NMS radii, scaled to each instance: a
    quarter of the distance from the keypoint to the nearest other keypoint of its instance,
    at least 1 px (a keypoint within 1 px is the same keypoint) and never more than
    ``max_radius`` (KEYPOINT_NMS_RADIUS).

    Tiny packed instances (same-type keypoints 2-10 px apart) do not reject each other, nor
    does a large instance the small one in its hole or in its concave side, while a large
    instance keeps the full radius against its own duplicate candidates."""
    d = torch.cdist(keypoints, keypoints)  # [J, P, P]
    d = d.masked_fill(torch.eye(NUM_KEYPOINTS, dtype=torch.bool, device=d.device), float("inf"))
    return (0.25 * d.amin(2)).clamp(min=1.0).clamp(max=max_radius)


def instance_boxes(keypoints: torch.Tensor) -> torch.Tensor:
    """[J, P, 2] keypoints -> [J, 4] boxes (x0, y0, x1, y1) spanned by the four corners."""
    corners = keypoints[:, :4]
    return torch.stack(
        [
            corners[..., 1].amin(1),
            corners[..., 0].amin(1),
            corners[..., 1].amax(1),
            corners[..., 0].amax(1),
        ],
        dim=1,
    )


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; boxes are inclusive pixel boxes (x0, y0, x1, y1). Returns kept indices
    sorted by decreasing score."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + 1).clamp(
        min=0
    )
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-6)
    keep = torch.ones(len(order), dtype=torch.bool)
    suppressed = (iou > iou_threshold).cpu()
    for i in range(len(order)):
        if keep[i]:
            later = suppressed[i].clone()
            later[: i + 1] = False
            keep &= ~later
    return order[keep.to(order.device)]


def group_instances(
    candidates: Dict[str, torch.Tensor],
    score_maps: torch.Tensor,
    mid_offsets: torch.Tensor,
    short_offsets: torch.Tensor,
    cfg: PostProcessConfig,
    pixel_keypoints: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy instance detection for one image.

    Candidates are taken in :func:`find_keypoints`'s order (a priority queue over all keypoint
    types, the most voted first); one lying within the rejection radius of the same-type
    keypoint of an already detected instance is rejected (:func:`rejection_radii` of both the
    detected instance and the instance the candidate proposes, the smaller: a small instance
    next to, or inside, a large one is not a duplicate of it; but at least 3 x the spread of
    the candidate's votes, at most ``keypoint_nms_radius``: ripples of one noisy vote cloud are
    duplicates); otherwise it starts the instance it proposes
    (:func:`propose_instances`: middle-range offsets along the star graph, checked against the
    corner's own pixels). Instance score = mean over its 5 keypoints of their
    :func:`support_scores` on the short-range maps, the detected instances' keypoints sharing
    the cells. Then score threshold and box NMS.

    Args:
        candidates: :func:`find_keypoints` output of the image.
        score_maps: [P, H, W] short-range maps (the second map of :func:`hough_score_maps`);
            mid_offsets: [E, 2, H, W]; short_offsets: [P, 2, H, W].
        pixel_keypoints: [T, P, 2] keypoints predicted at the thing pixels, for the corners
            whose walk through the center is suspect (:func:`propose_instances`).

    Returns:
        keypoints [J, P, 2] (y, x) and scores [J], sorted by decreasing score.
    """
    M = candidates["y"].numel()
    empty = (score_maps.new_zeros(0, NUM_KEYPOINTS, 2), score_maps.new_zeros(0))
    if M == 0:
        return empty
    proposals = propose_instances(
        candidates, mid_offsets, short_offsets, cfg.refine_steps, pixel_keypoints, cfg.oks_sigma
    )

    # greedy pass, on the CPU (a few hundred candidates at most)
    pos = torch.stack([candidates["y"], candidates["x"]], 1).cpu()
    props = proposals.cpu()
    radii = rejection_radii(props, cfg.keypoint_nms_radius)
    # dup[j, i]: candidate i lies within the rejection radius of keypoint type(i) of the
    # instance j proposes: the smaller radius of the two instances, or 3 x the spread of the
    # candidate's votes if larger (peaks in one noisy vote cloud), at most keypoint_nms_radius
    t = candidates["type"].cpu()
    r = torch.minimum(radii[:, t], radii[torch.arange(M), t][None])
    spread = candidates.get("spread")
    if spread is not None:
        r = torch.maximum(r, 3.0 * spread.cpu()[None]).clamp(max=cfg.keypoint_nms_radius)
    dup = (((props[:, t] - pos[None]) ** 2).sum(-1) < r * r).numpy()
    blocked = np.zeros(M, dtype=bool)
    accepted: List[int] = []
    for i in range(M):  # in the queue's order
        if blocked[i]:
            continue
        accepted.append(i)
        blocked |= dup[i]
        if len(accepted) >= cfg.max_instances:
            break
    idx = torch.tensor(accepted, dtype=torch.long, device=proposals.device)
    kps = proposals[idx]
    # every keypoint type in one call: [J * P] hypotheses, keypoint k of instance j at j * P + k
    J = kps.shape[0]
    types = torch.arange(NUM_KEYPOINTS, device=kps.device).repeat(J)
    flat = kps.reshape(J * NUM_KEYPOINTS, 2)
    scores = support_scores(
        score_maps, flat[:, 0], flat[:, 1], cfg.keypoint_radius, cfg.oks_sigma, types=types
    )
    scores = scores.view(J, NUM_KEYPOINTS).mean(1)
    good = scores >= cfg.instance_score_threshold
    kps, scores = kps[good], scores[good]
    if kps.shape[0] == 0:
        return empty
    keep = box_nms(instance_boxes(kps), scores, cfg.box_nms_threshold)
    return kps[keep], scores[keep]


# --------------------------------------------------------------------------------------------
# 5. pixel assignment
# --------------------------------------------------------------------------------------------
def assign_pixels(
    predicted_keypoints: torch.Tensor, instance_keypoints: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    """Nearest instance of each pixel, comparing the pixel's predicted keypoints with the
    instances' keypoints: the sum over the 5 keypoints of squared L2 distances, accumulated
    coordinate by coordinate ``d = 0; d = d + (a_c - b_c)^2`` for c = y_0, x_0, ..., y_4, x_4
    (the arithmetic of the compiled ``assign_pixels``, so the two agree bit for bit; no
    ``|a|^2 - 2 a.b + |b|^2`` expansion, which loses precision far from the origin).

    Args:
        predicted_keypoints: [T, P, 2] keypoints predicted at T pixels (``x + L_k(x)``); may
            be a strided view (e.g. the transpose of a [P, T, 2] tensor): each chunk is
            gathered on its own.
        instance_keypoints: [J, P, 2], J >= 1.
        chunk: pixels per chunk: memory is O(chunk * J), never O(T * J).

    Returns:
        [T] int64 instance index of each pixel: the first one at the smallest distance; a NaN
        distance never wins (0 when no distance is finite).
    """
    T = predicted_keypoints.shape[0]
    b = instance_keypoints.reshape(instance_keypoints.shape[0], -1)
    out = torch.empty(T, dtype=torch.long, device=b.device)
    for s in range(0, T, chunk):
        part = predicted_keypoints[s : s + chunk].reshape(-1, b.shape[1])
        d = part.new_zeros(part.shape[0], b.shape[0])
        for c in range(b.shape[1]):
            e = part[:, c, None] - b[None, :, c]
            d += e * e
        d.masked_fill_(d.isnan(), math.inf)
        out[s : s + chunk] = d.argmin(1)
    return out


def pixel_instance_map(
    predicted_keypoints: torch.Tensor,
    pixels: torch.Tensor,
    instance_keypoints: torch.Tensor,
    size: Tuple[int, int],
    chunk: int = 1 << 16,
    use_compiled: Optional[bool] = None,
) -> torch.Tensor:
    """Step 5 for one image: the instance map, -1 everywhere but at the thing pixels, which
    get their nearest instance (:func:`assign_pixels`).

    On the CPU, one call of the compiled ``deeperlab_d2::assign_pixels`` when it is built
    (``use_compiled``: None = when available, True = required, False = never); otherwise, and
    on other devices, :func:`assign_pixels` and an indexed write. The two are bit-equal.

    Args:
        predicted_keypoints: [T, P, 2] keypoints predicted at the thing pixels.
        pixels: [T] int64 flat indices ``y * W + x`` of the thing pixels.
        instance_keypoints: [J, P, 2] (J = 0: no instance, every pixel gets -1).
        size: (H, W).
        chunk: pixels per chunk of :func:`assign_pixels`.

    Returns:
        [H, W] int64 instance index per pixel (-1 = none).
    """
    H, W = size
    device = predicted_keypoints.device
    if use_compiled is None:
        use_compiled = compiled_op_available(device, "assign_pixels")
    elif use_compiled:
        _use_compiled("assign_pixels", device, True)
    if use_compiled:
        return torch.ops.deeperlab_d2.assign_pixels(
            predicted_keypoints, pixels, instance_keypoints, H, W
        )
    instance_map = torch.full((H * W,), -1, dtype=torch.long, device=device)
    if instance_keypoints.shape[0] > 0 and pixels.numel() > 0:
        instance_map[pixels] = assign_pixels(predicted_keypoints, instance_keypoints, chunk)
    return instance_map.view(H, W)


# --------------------------------------------------------------------------------------------
# 6. fusion
# --------------------------------------------------------------------------------------------
def fuse_panoptic(
    semantic: torch.Tensor,
    instance_map: torch.Tensor,
    instance_scores: torch.Tensor,
    thing_ids: Sequence[int],
    num_classes: int,
    cfg: PostProcessConfig,
    use_compiled: Optional[bool] = None,
) -> Tuple[torch.Tensor, List[dict]]:
    """Panoptic id map and segments_info from semantic labels and instance assignment.

    Args:
        semantic: [H, W] int64 contiguous class per pixel, -1 = void (no segment).
        instance_map: [H, W] int64 instance index per thing pixel, -1 elsewhere.
        instance_scores: [J].
        thing_ids: contiguous ids of the thing classes.
        num_classes: C.
        cfg: ``thing_area``, ``stuff_area``.

    Returns:
        (panoptic [H, W] int32 with 0 = void, segments_info: dicts with ``id``, ``category_id``
        (contiguous), ``isthing``, ``score``, ``area``; things first, by decreasing score).
        An instance's class is the majority semantic label of its pixels (the smallest class
        id on a tie).

    Two passes over the map: each pixel's (instance, class) pair as one index
    ``(instance + 1) * (C + 1) + (class + 1)``, whose histogram gives the instances' class
    votes and areas and the stuff areas, and whose lookup in a ``[(J + 1) x (C + 1)]`` table of
    segment ids gives the panoptic map (a void pixel -> 0; a labeled pixel of instance j -> j's
    segment, 0 if dropped; a pixel of no instance -> its stuff segment, 0 for a thing class).
    One transfer of the histogram to the host; no per-instance device work. On the CPU the two
    passes are the compiled ``deeperlab_d2::panoptic_histogram`` and ``panoptic_lookup`` when
    they are built (``use_compiled``: None = when available, False = never; no key map is
    materialized; the same result).
    """
    device = semantic.device
    C = num_classes
    J = instance_scores.numel()
    is_thing = [False] * C
    for c in thing_ids:
        is_thing[c] = True
    compiled = (
        _cpu_kernel("panoptic_histogram", semantic)
        and _cpu_kernel("panoptic_lookup", semantic)
        and semantic.dtype == instance_map.dtype == torch.long
        and use_compiled is not False
    )
    if compiled:  # the same two passes, compiled, without the full-size key map
        hist = torch.ops.deeperlab_d2.panoptic_histogram(semantic, instance_map, C, J)
        hist = hist.view(J + 1, C + 1)
    else:
        key = torch.add(semantic, instance_map, alpha=C + 1).add_(C + 2)
        hist = torch.bincount(key.view(-1), minlength=(J + 1) * (C + 1)).view(J + 1, C + 1).cpu()
    # segment id per (instance + 1, class + 1); row 0 = no instance, column 0 = void
    lut = torch.zeros(J + 1, C + 1, dtype=torch.int32)
    segments: List[dict] = []
    if J > 0:
        votes = hist[1:, 1:] * torch.tensor(is_thing)  # [J, C], thing classes only
        areas = votes.sum(1).tolist()
        classes = votes.argmax(1).tolist()
        scores = instance_scores.tolist()
        for j in instance_scores.argsort(descending=True).tolist():
            if areas[j] == 0 or areas[j] < cfg.thing_area:
                continue
            seg_id = len(segments) + 1
            lut[j + 1, 1:] = seg_id
            segments.append(
                {
                    "id": seg_id,
                    "category_id": classes[j],
                    "isthing": True,
                    "score": scores[j],
                    "area": areas[j],
                }
            )
    for c, area in enumerate(hist[0, 1:].tolist()):  # labeled pixels of no instance
        if is_thing[c] or area == 0 or area < cfg.stuff_area:
            continue
        seg_id = len(segments) + 1
        lut[0, c + 1] = seg_id
        segments.append(
            {"id": seg_id, "category_id": c, "isthing": False, "score": 1.0, "area": area}
        )
    if compiled:
        return torch.ops.deeperlab_d2.panoptic_lookup(semantic, instance_map, lut), segments
    return torch.take(lut.to(device), key), segments


# --------------------------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------------------------
InstanceFn = Callable[..., List[Dict[str, torch.Tensor]]]


def panoptic_inference(
    sem_seg_logits: torch.Tensor,
    instance_outputs: Dict[str, torch.Tensor],
    instance_fn: InstanceFn,
    thing_ids: Sequence[int],
    fusion_cfg,
    image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[Dict[str, object]]:
    """Head outputs of a batch -> panoptic segmentation of each image, for any instance
    representation: the shared steps around a representation's ``instance_fn``.

    1. every tensor is detached, cast to float32 and processed with autocast and autograd off;
    2. with ``image_sizes`` that differ from the tensors' size, each image's valid top-left
       ``h x w`` part is processed on its own (padding never reaches the post-processing);
    3. ``semantic`` = :func:`semantic_labels` of the logits (-1 = no finite logit = void) and the
       thing mask;
    4. ``instance_fn(sem_seg_logits, semantic, thing_mask, **instance_outputs)`` returns, per
       image, a dict with ``instance_map`` [H, W] int64 (-1 = none) and ``instance_scores`` [J]
       (and whatever else it wants to report, e.g. keypoints or centers);
    5. :func:`fuse_panoptic` (majority-vote classes, stuff segments, area thresholds).

    Args:
        sem_seg_logits: [N, C, H, W].
        instance_outputs: the representation's head outputs, each [N, ..., H, W].
        instance_fn: see step 4.
        thing_ids: contiguous ids of thing classes.
        fusion_cfg: has ``thing_area`` and ``stuff_area``.
        image_sizes: optional (h, w) per image.

    Returns:
        per image the dict of ``instance_fn`` plus ``panoptic`` [h, w] int32 (0 = void),
        ``segments_info`` (see :func:`fuse_panoptic`) and ``semantic`` [h, w] int64.
    """
    # not differentiable: no autograd graph, whatever the caller's grad mode
    sem_seg_logits = sem_seg_logits.detach().float()  # no copy when already float32
    instance_outputs = {k: v.detach().float() for k, v in instance_outputs.items()}
    N, C, H, W = sem_seg_logits.shape
    with _autocast_disabled(sem_seg_logits.device), torch.no_grad():
        if image_sizes is not None and any(tuple(s) != (H, W) for s in image_sizes):
            # different valid sizes: process each image at its own size
            return [
                _panoptic_batch(
                    sem_seg_logits[i : i + 1, :, :h, :w],
                    {k: v[i : i + 1, ..., :h, :w] for k, v in instance_outputs.items()},
                    instance_fn,
                    thing_ids,
                    fusion_cfg,
                )[0]
                for i, (h, w) in enumerate(image_sizes)
            ]
        return _panoptic_batch(sem_seg_logits, instance_outputs, instance_fn, thing_ids, fusion_cfg)


def _panoptic_batch(sem_seg_logits, instance_outputs, instance_fn, thing_ids, fusion_cfg):
    # :func:`panoptic_inference` on float32 inputs of one valid size, autocast off
    C = sem_seg_logits.shape[1]
    semantic, thing_mask = classify_pixels(sem_seg_logits, thing_ids)  # -1 = void: no thing
    instances = instance_fn(sem_seg_logits, semantic, thing_mask, **instance_outputs)
    results = []
    for n, inst in enumerate(instances):
        panoptic, segments = fuse_panoptic(
            semantic[n], inst["instance_map"], inst["instance_scores"], thing_ids, C, fusion_cfg
        )
        results.append({**inst, "panoptic": panoptic, "segments_info": segments})
        results[-1]["semantic"] = semantic[n]
    return results


def deeperlab_instances(
    sem_seg_logits: torch.Tensor,
    semantic: torch.Tensor,
    thing_mask: torch.Tensor,
    heatmap_logits: torch.Tensor,
    short_offsets: torch.Tensor,
    mid_offsets: torch.Tensor,
    long_offsets: torch.Tensor,
    cfg: PostProcessConfig,
    return_maps: bool = False,
) -> List[Dict[str, torch.Tensor]]:
    """DeeperLab's instance stage (steps 1-5 above) of a batch of one valid size.

    Args:
        sem_seg_logits, semantic: unused here (the signature of an ``instance_fn`` of
            :func:`panoptic_inference`).
        thing_mask: [N, H, W] bool, pixels whose semantic class is a thing.
        heatmap_logits: [N, P, H, W]; short_offsets, long_offsets: [N, P, 2, H, W];
            mid_offsets: [N, E, 2, H, W]; float32.
        cfg: thresholds.
        return_maps: also return, per image, ``score_maps`` [P, H, W] (the fused Hough maps)
            and ``keypoint_candidates`` (see :func:`find_keypoints`), for pictures.

    Returns:
        per image ``instance_map`` [H, W] int64 (-1 = none), ``instance_scores`` [J] and
        ``instance_keypoints`` [J, P, 2].
    """
    N, _, H, W = heatmap_logits.shape
    # the thing pixels, found once (by image, raster order, as flat indices y * W + x): the
    # long-range votes and the pixel assignment read only them
    pn, pixels = torch.nonzero(thing_mask.reshape(N, H * W), as_tuple=True)
    counts = torch.bincount(pn, minlength=N).tolist()

    results = []
    for n, flat in enumerate(pixels.split(counts)):
        # 1-2. refined keypoints of the thing pixels [T, P, 2] and the score maps
        score_maps, short_maps, pk = keypoint_votes(
            heatmap_logits[n], short_offsets[n], long_offsets[n], flat, cfg
        )
        # 3. keypoint candidates
        (candidates,) = find_keypoints(score_maps[None], cfg, short_maps[None])
        # 4. instances
        kps, scores = group_instances(
            candidates, short_maps, mid_offsets[n], short_offsets[n], cfg, pk
        )
        # 5. pixel assignment
        instance_map = pixel_instance_map(pk, flat, kps, (H, W), cfg.assign_chunk)
        results.append(
            {"instance_map": instance_map, "instance_scores": scores, "instance_keypoints": kps}
        )
        if return_maps:
            results[-1].update(score_maps=score_maps, keypoint_candidates=candidates)
    return results


def deeperlab_panoptic_inference(
    sem_seg_logits: torch.Tensor,
    heatmap_logits: torch.Tensor,
    short_offsets: torch.Tensor,
    mid_offsets: torch.Tensor,
    long_offsets: torch.Tensor,
    thing_ids: Sequence[int],
    cfg: PostProcessConfig,
    image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[Dict[str, object]]:
    """DeeperLab head outputs of a batch -> panoptic segmentation of each image.

    Args:
        sem_seg_logits: [N, C, H, W]; heatmap_logits: [N, P, H, W];
        short_offsets, long_offsets: [N, P, 2, H, W]; mid_offsets: [N, E, 2, H, W]; offsets
            (dy, dx) in pixels of this resolution. Any floating dtype: all are cast to float32
            and processed with autocast disabled. Semantic logits may hold NaN/inf: see
            :func:`semantic_labels`.
        thing_ids: contiguous ids of thing classes.
        cfg: thresholds (``post_process_config(cfg)`` of a Detectron2 config).
        image_sizes: optional (h, w) per image: only the top-left h x w part is valid
            (padding is cropped before any processing).

    Returns:
        per image a dict: ``panoptic`` [h, w] int32 (0 = void), ``segments_info`` (see
        :func:`fuse_panoptic`), ``semantic`` [h, w] int64 (-1 = void: no finite logit),
        ``instance_keypoints`` [J, P, 2], ``instance_scores`` [J] (float32),
        ``instance_map`` [h, w] int64 (-1 = none).
    """
    outputs = {
        "heatmap_logits": heatmap_logits,
        "short_offsets": short_offsets,
        "mid_offsets": mid_offsets,
        "long_offsets": long_offsets,
    }
    return panoptic_inference(
        sem_seg_logits,
        outputs,
        functools.partial(deeperlab_instances, cfg=cfg),
        thing_ids,
        cfg,
        image_sizes,
    )
