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
2. :func:`hough_score_maps` - short-range votes (weight = heatmap probability) and long-range
   votes (weight 1 per thing pixel) splatted bilinearly by the Hough-voting op, normalized by
   the disk area ``pi R^2`` and fused by a weighted sum.
3. :func:`find_keypoints` - local maxima above a threshold, sub-pixel refined, rescored with
   :func:`expected_oks_scores`.
4. :func:`group_instances` - greedy decoding in score order along the star graph, then
   :func:`box_nms`.
5. :func:`assign_pixels` - each thing pixel to the instance whose keypoints are nearest to its
   predicted keypoints, in pixel chunks (never an ``[instances x H*W]`` tensor).
6. :func:`fuse_panoptic` - majority-vote instance classes, stuff segments, final id map.

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

import torch
import torch.nn.functional as F

from .hough_voting import hough_voting
from .keypoints import CENTER, KEYPOINT_EDGES, NUM_EDGES, NUM_KEYPOINTS  # noqa: F401


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
    keypoint_threshold: float  # expected-OKS score a keypoint candidate needs
    keypoint_nms_radius: float  # px, same-type keypoints of detected instances
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
    ``-inf``, so that softmax and bilinear resizing stay NaN-free.
    """
    return torch.where(torch.isfinite(logits), logits, torch.finfo(logits.dtype).min)


def semantic_labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of [N, C, H, W] logits: argmax over the finite logits of the pixel.

    Returns:
        [N, H, W] int64; -1 (void) where no logit of the pixel is finite.
    """
    finite = torch.isfinite(logits)
    labels = torch.where(finite, logits, float("-inf")).argmax(1)
    return torch.where(finite.any(1), labels, -1)


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
def sample_fields(fields: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample B maps at B sets of points (zero outside), with ``grid_sample``.

    Args:
        fields: [B, C, H, W].
        ys, xs: [B, T] float positions (pixels).

    Returns:
        [B, C, T].
    """
    H, W = fields.shape[-2:]
    grid = torch.stack([xs * (2.0 / max(W - 1, 1)) - 1.0, ys * (2.0 / max(H - 1, 1)) - 1.0], -1)
    out = F.grid_sample(
        fields, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[:, :, 0]


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
    lo = long_offsets[:, :, ys, xs]  # [P, 2, T]
    yf, xf = ys.to(lo.dtype)[None], xs.to(lo.dtype)[None]
    for _ in range(steps):
        lo = lo + sample_fields(short_offsets, yf + lo[:, 0], xf + lo[:, 1])
    return lo


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
    long_offsets: torch.Tensor,
    thing_mask: torch.Tensor,
    cfg: PostProcessConfig,
) -> torch.Tensor:
    """Fused keypoint score maps from short- and long-range Hough votes.

    Args:
        heatmap_probs: [N, P, H, W] keypoint probabilities (sigmoid of the heatmap logits).
        short_offsets: [N, P, 2, H, W].
        long_offsets: [N, P, 2, H, W] (refined at thing pixels).
        thing_mask: [N, H, W] bool, pixels predicted as a thing class.
        cfg: weights ``short_vote_weight``, ``long_vote_weight``, ``min_vote_prob``, ``R``.

    Returns:
        [N, P, H, W]: ``(ws * short_votes + wl * long_votes) / (pi R^2)``. A perfectly
        predicted keypoint whose disk lies inside the image collects 1 from the short range.
    """
    H, W = heatmap_probs.shape[-2:]
    norm = 1.0 / (math.pi * cfg.keypoint_radius**2)
    short_w = torch.where(heatmap_probs >= cfg.min_vote_prob, heatmap_probs, 0.0)
    score = hough_voting(short_offsets, short_w, (H, W)) * (cfg.short_vote_weight * norm)
    if cfg.long_vote_weight > 0:
        long_w = thing_mask[:, None].to(heatmap_probs.dtype).expand_as(heatmap_probs)
        score += hough_voting(long_offsets, long_w.contiguous(), (H, W)) * (
            cfg.long_vote_weight * norm
        )
    return score


# --------------------------------------------------------------------------------------------
# 3. keypoints
# --------------------------------------------------------------------------------------------
def expected_oks_scores(
    score_map: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Expected-OKS style score of keypoint hypotheses.

    The fused map is (locally) a vote density whose mass is the probability that a keypoint
    is there; the expected OKS of placing the keypoint at ``p`` is the mass weighted by the OKS
    kernel ``exp(-|q - p|^2 / (2 sigma^2))`` over the nearby cells ``q``, clipped to [0, 1].

    Args:
        score_map: [H, W] fused map of one keypoint type.
        ys, xs: [M] float positions.
        sigma: OKS kernel width (px).

    Returns:
        [M] scores in [0, 1].
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
    return (vals * kernel).flatten(1).sum(1).clamp(max=1.0)


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
    score_maps: torch.Tensor, cfg: PostProcessConfig
) -> List[Dict[str, torch.Tensor]]:
    """Keypoint candidates: local maxima of the fused maps, sub-pixel refined and rescored.

    Args:
        score_maps: [N, P, H, W] fused score maps.
        cfg: ``peak_kernel``, ``peak_threshold``, ``max_keypoints``, ``oks_sigma``,
            ``keypoint_threshold``.

    Returns:
        per image, a dict of ``type`` [M] (keypoint index), ``y``, ``x`` [M] float positions and
        ``score`` [M] expected-OKS scores >= ``keypoint_threshold``, sorted by score.
    """
    N, P, H, W = score_maps.shape
    is_peak = (score_maps == window_max(score_maps, cfg.peak_kernel)) & (
        score_maps > cfg.peak_threshold
    )
    # peaks are sparse: take them all, then keep the max_keypoints best of each (image, type)
    n_idx, k_idx, y_idx, x_idx = torch.nonzero(is_peak, as_tuple=True)
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
        scores = torch.zeros_like(ys)
        for t in range(P):
            sel = types == t
            if sel.any():
                scores[sel] = expected_oks_scores(score_maps[n, t], ys[sel], xs[sel], cfg.oks_sigma)
        good = scores >= cfg.keypoint_threshold
        types, ys, xs, scores = types[good], ys[good], xs[good], scores[good]
        order = scores.argsort(descending=True, stable=True)
        types, ys, xs, scores = types[order], ys[order], xs[order], scores[order]
        # a plateau (e.g. a keypoint exactly between cells) gives several equal maxima with the
        # same sub-pixel position: keep the first of same-type candidates closer than 1 px
        d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
        dup = (
            (d2 < 1.0)
            & (types[:, None] == types[None])
            & torch.ones_like(d2, dtype=torch.bool).tril(-1)
        )
        keep = ~dup.any(1)
        results.append({"type": types[keep], "y": ys[keep], "x": xs[keep], "score": scores[keep]})
    return results


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
) -> torch.Tensor:
    """The instance each keypoint candidate would start, following the star graph.

    From a center candidate, each corner is ``c + M_{c->corner}(c)``; from a corner candidate
    ``q``, the center is ``q + M_{q->c}(q)`` and the other corners follow from that center.

    Args:
        candidates: output of :func:`find_keypoints` for one image (M candidates).
        mid_offsets: [E, 2, H, W]; short_offsets: [P, 2, H, W] of that image.
        steps: refinement steps of the middle-range offsets.

    Returns:
        [M, P, 2] proposed keypoints (y, x) per candidate.
    """
    types, ys, xs = candidates["type"], candidates["y"], candidates["x"]
    M = ys.numel()
    kps = ys.new_zeros(M, NUM_KEYPOINTS, 2)
    cy, cx = ys.clone(), xs.clone()
    for k in range(4):  # corner candidates: walk to the center
        sel = types == k
        if sel.any():
            cy[sel], cx[sel] = follow_mid_offsets(
                mid_offsets,
                short_offsets,
                KEYPOINT_EDGES.index((k, CENTER)),
                ys[sel],
                xs[sel],
                steps,
            )
    kps[:, CENTER, 0], kps[:, CENTER, 1] = cy, cx
    for k in range(4):  # every candidate: from the center to each corner
        ky, kx = follow_mid_offsets(
            mid_offsets, short_offsets, KEYPOINT_EDGES.index((CENTER, k)), cy, cx, steps
        )
        own = types == k  # a corner candidate keeps its own position
        kps[:, k, 0] = torch.where(own, ys, ky)
        kps[:, k, 1] = torch.where(own, xs, kx)
    return kps


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy instance detection for one image.

    Candidates are taken in decreasing score (a priority queue over all keypoint types); one
    lying within ``keypoint_nms_radius`` of the same-type keypoint of an already detected
    instance is rejected; otherwise it starts an instance whose other keypoints follow the
    middle-range offsets (:func:`propose_instances`). Instance score = mean expected-OKS score
    of its 5 keypoints. Then score threshold and box NMS.

    Args:
        candidates: :func:`find_keypoints` output of the image.
        score_maps: [P, H, W]; mid_offsets: [E, 2, H, W]; short_offsets: [P, 2, H, W].

    Returns:
        keypoints [J, P, 2] (y, x) and scores [J], sorted by decreasing score.
    """
    M = candidates["y"].numel()
    empty = (score_maps.new_zeros(0, NUM_KEYPOINTS, 2), score_maps.new_zeros(0))
    if M == 0:
        return empty
    proposals = propose_instances(candidates, mid_offsets, short_offsets, cfg.refine_steps)
    kp_scores = torch.stack(
        [
            expected_oks_scores(
                score_maps[k], proposals[:, k, 0], proposals[:, k, 1], cfg.oks_sigma
            )
            for k in range(NUM_KEYPOINTS)
        ],
        dim=1,
    )
    inst_scores = kp_scores.mean(1)

    # greedy pass, on the CPU (a few hundred candidates at most)
    types = candidates["type"].cpu().tolist()
    pos = torch.stack([candidates["y"], candidates["x"]], 1).cpu()
    props = proposals.cpu()
    r2 = cfg.keypoint_nms_radius**2
    accepted: List[int] = []
    accepted_kps = torch.zeros(0, NUM_KEYPOINTS, 2)
    for i in range(M):  # candidates are sorted by score
        k = types[i]
        if accepted and ((accepted_kps[:, k] - pos[i]) ** 2).sum(1).min() < r2:
            continue
        accepted.append(i)
        accepted_kps = torch.cat([accepted_kps, props[i : i + 1]])
        if len(accepted) >= cfg.max_instances:
            break
    idx = torch.tensor(accepted, dtype=torch.long, device=proposals.device)
    kps, scores = proposals[idx], inst_scores[idx]
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
    instances' keypoints (sum over the 5 keypoints of squared L2 distances).

    Args:
        predicted_keypoints: [T, P, 2] keypoints predicted at T pixels (``x + L_k(x)``).
        instance_keypoints: [J, P, 2], J >= 1.
        chunk: pixels per chunk: memory is O(chunk * J), never O(T * J).

    Returns:
        [T] int64 instance index of each pixel.
    """
    T = predicted_keypoints.shape[0]
    a = predicted_keypoints.reshape(T, -1)
    b = instance_keypoints.reshape(instance_keypoints.shape[0], -1)
    out = torch.empty(T, dtype=torch.long, device=a.device)
    b2 = (b * b).sum(1)
    for s in range(0, T, chunk):
        part = a[s : s + chunk]
        # |a - b|^2 = |a|^2 - 2 a.b + |b|^2; |a|^2 is the same for every instance
        d = b2[None, :] - 2.0 * (part @ b.T)
        out[s : s + chunk] = d.argmin(1)
    return out


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
        An instance's class is the majority semantic label of its pixels.
    """
    device = semantic.device
    segments: List[dict] = []
    J = instance_scores.numel()
    is_thing = torch.zeros(num_classes, dtype=torch.bool, device=device)
    is_thing[list(thing_ids)] = True
    # segment id of every instance (index j + 1; 0 = dropped) and of every stuff class
    instance_lut = torch.zeros(J + 1, dtype=torch.int32, device=device)
    stuff_lut = torch.zeros(num_classes, dtype=torch.int32, device=device)
    labeled = semantic >= 0
    semantic = semantic.clamp(min=0)  # void pixels are masked out below by ``labeled``
    if J > 0:
        inst = instance_map.flatten()
        sel = (inst >= 0) & labeled.flatten()
        votes = torch.bincount(
            inst[sel] * num_classes + semantic.flatten()[sel], minlength=J * num_classes
        ).view(J, num_classes)
        votes[:, ~is_thing] = 0
        areas = votes.sum(1).tolist()
        classes = votes.argmax(1).tolist()
        for j in instance_scores.argsort(descending=True).tolist():
            if areas[j] == 0 or areas[j] < cfg.thing_area:
                continue
            seg_id = len(segments) + 1
            instance_lut[j + 1] = seg_id
            segments.append(
                {
                    "id": seg_id,
                    "category_id": classes[j],
                    "isthing": True,
                    "score": float(instance_scores[j]),
                    "area": areas[j],
                }
            )
    stuff_pixels = (instance_map < 0) & labeled & ~is_thing[semantic]
    stuff_areas = torch.bincount(semantic[stuff_pixels], minlength=num_classes).tolist()
    for c, area in enumerate(stuff_areas):
        if area == 0 or area < cfg.stuff_area:
            continue
        seg_id = len(segments) + 1
        stuff_lut[c] = seg_id
        segments.append(
            {"id": seg_id, "category_id": c, "isthing": False, "score": 1.0, "area": area}
        )
    panoptic = torch.where(
        stuff_pixels, stuff_lut[semantic], instance_lut[(instance_map + 1).clamp(min=0)]
    )
    panoptic = torch.where(labeled, panoptic, 0)
    return panoptic, segments


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
    semantic = semantic_labels(sem_seg_logits)  # [N, H, W], -1 = void
    is_thing = torch.zeros(C, dtype=torch.bool, device=semantic.device)
    is_thing[list(thing_ids)] = True
    thing_mask = is_thing[semantic.clamp(min=0)] & (semantic >= 0)
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
    device = heatmap_logits.device
    heat = heatmap_logits.sigmoid()

    # 1. refined long-range offsets at thing pixels; predicted keypoints of those pixels
    refined_long = torch.zeros_like(long_offsets)
    pixel_kps = []
    for n in range(N):
        ys, xs = torch.nonzero(thing_mask[n], as_tuple=True)
        lo = refine_long_offsets(long_offsets[n], short_offsets[n], ys, xs, cfg.refine_steps)
        refined_long[n][:, :, ys, xs] = lo
        pk = torch.stack([ys.to(lo.dtype)[None] + lo[:, 0], xs.to(lo.dtype)[None] + lo[:, 1]], -1)
        pixel_kps.append((ys, xs, pk.transpose(0, 1)))  # [T, P, 2]

    # 2-3. score maps and keypoint candidates
    score_maps = hough_score_maps(heat, short_offsets, refined_long, thing_mask, cfg)
    candidates = find_keypoints(score_maps, cfg)

    results = []
    for n in range(N):
        kps, scores = group_instances(
            candidates[n], score_maps[n], mid_offsets[n], short_offsets[n], cfg
        )
        instance_map = torch.full((H, W), -1, dtype=torch.long, device=device)
        ys, xs, pk = pixel_kps[n]
        if kps.shape[0] > 0 and ys.numel() > 0:
            instance_map[ys, xs] = assign_pixels(pk, kps, cfg.assign_chunk)
        results.append(
            {"instance_map": instance_map, "instance_scores": scores, "instance_keypoints": kps}
        )
        if return_maps:
            results[-1].update(score_maps=score_maps[n], keypoint_candidates=candidates[n])
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
