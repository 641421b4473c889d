"""Panoptic-DeepLab post-processing (Cheng et al. 2020): center heatmap + center offsets.

A second instance representation next to DeeperLab's keypoints: the network predicts a center
heatmap and, at every pixel, the offset ``(dy, dx)`` from the pixel to the center of its
instance. Torch only (no Detectron2), same conventions as
:mod:`deeperlab_d2.layers.post_processing`: positions ``(y, x)`` in pixels (integer = pixel
center), offset fields with ``(dy, dx)`` along a ``2`` axis, batched inputs, ``image_sizes``
for padded batches, the same output keys.

Pipeline (:func:`panoptic_deeplab_inference`):

1. semantic labels: argmax over the finite logits (``post_processing.semantic_labels``; a
   pixel without a finite logit is void); thing pixels are those whose label is a thing class;
2. :func:`find_centers` - heatmap values above ``center_threshold`` that equal the max over a
   ``nms_kernel`` x ``nms_kernel`` window, the ``top_k`` best per image;
3. :func:`assign_to_centers` - each thing pixel goes to the center nearest to its predicted
   center ``(y + dy, x + dx)``; in pixel chunks over the whole batch (never an
   ``[instances x H*W]`` tensor);
4. :func:`center_instance_scores` - score = center-heatmap value at the instance's centroid x
   mean softmax probability of its (majority) class over its pixels, as Detectron2's
   ``PanopticDeepLab`` scores its instances;
5. :func:`~deeperlab_d2.layers.post_processing.fuse_panoptic` - the same majority-vote fusion as
   DeeperLab.

Steps 2-4 are :func:`center_instances`, the representation's ``instance_fn`` of
:func:`~deeperlab_d2.layers.post_processing.panoptic_inference`, which does the rest (float32
cast, autocast off, cropping of padded images, semantic labels, fusion).

Agreement with Detectron2's ``projects/panoptic_deeplab/post_processing.py``
(``get_panoptic_segmentation``), checked by ``tests/test_center_post_processing.py``: same
partition and same class per segment, up to segment id renumbering, except where the
implementations legitimately differ:

* top-k: the ``top_k`` highest peaks are kept (ties at the k-th score: first in raster order).
  Detectron2 keeps only the peaks *strictly above* the k-th highest heatmap value, i.e. at most
  ``top_k - 1`` peaks and none of those tied with the k-th one; with more than ``top_k`` peaks
  of distinct scores, ``top_k = k`` here equals ``top_k = k + 1`` there. Detectron2 also fails
  when ``top_k`` exceeds the number of pixels; here it does not.
* majority vote: an instance whose pixels tie between several thing classes takes the smallest
  class id (``fuse_panoptic``); Detectron2 takes ``torch.mode``'s choice.
* ``thing_area``: instances with fewer pixels are void here; Detectron2 has no such threshold
  (``thing_area = 0`` reproduces it).
* ``nms_kernel`` must be odd (an even one makes Detectron2's max-pooled map one pixel smaller and
  its comparison fail).
* NaN-safety: NaN heatmap values are never centers (nor suppress a neighbour), a pixel whose
  predicted center is not finite is unassigned (void), a pixel with NaN logits takes the
  argmax of its finite logits. Detectron2 does not guard against NaN.
* distances: squared Euclidean distances here, ``torch.norm`` there; both take the first
  nearest center in raster order on an exact tie, but float rounding of the square root may
  turn two nearly equal distances into a tie there and not here.
* instance score: the centroid is floored exactly (integer arithmetic); Detectron2 truncates a
  float32 mean, which may round up to the next integer for masks of millions of pixels.

Thing pixels when an image has no center: they stay unassigned, hence void in the panoptic map
(as in Detectron2, where the instance map is all zeros and only stuff is pasted).
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .post_processing import panoptic_inference, window_max


@dataclass
class CenterPostProcessConfig:
    """Thresholds of the Panoptic-DeepLab post-processing. The defaults live in the Detectron2
    config only (``MODEL.DEEPERLAB.CENTER.*``; paper values: center_threshold 0.1, nms_kernel 7,
    top_k 200); as in ``PostProcessConfig``, only the memory bound has one here."""

    center_threshold: float  # a center's heatmap value must be strictly above this
    nms_kernel: int  # odd max-pool window of the local-maximum test
    top_k: int  # centers kept per image
    thing_area: int  # instances with fewer pixels are dropped (void)
    stuff_area: int  # stuff segments with fewer pixels are dropped (void)
    # pixels per chunk in the pixel-to-center assignment and the scores (memory bound, not a
    # threshold): memory O(chunk x max(centers of an image, classes))
    assign_chunk: int = 1 << 16


# --------------------------------------------------------------------------------------------
# 2. centers
# --------------------------------------------------------------------------------------------
def find_centers(
    center_heatmap: torch.Tensor, threshold: float, nms_kernel: int, top_k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance centers: local maxima of the center heatmap, above a threshold, top-k.

    A pixel is a center when its value is strictly above ``threshold`` and equal to the max of
    the ``nms_kernel`` x ``nms_kernel`` window around it (so the pixels of a plateau are all
    kept); then the ``top_k`` highest of each image (ties: first in raster order). NaN values
    are never centers and do not suppress their neighbours.

    Args:
        center_heatmap: [N, 1, H, W] heatmap (used as is: no sigmoid).
        threshold, nms_kernel (odd), top_k: see :class:`CenterPostProcessConfig`.

    Returns:
        ``batch`` [K] int64 image index, ``centers`` [K, 2] int64 (y, x), ``scores`` [K]
        heatmap values; sorted by image, then in raster order within an image.
    """
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
    N = center_heatmap.shape[0]
    heat = center_heatmap[:, 0]
    heat = torch.where(torch.isnan(heat), float("-inf"), heat)
    peaks = (heat > threshold) & (heat == window_max(heat, nms_kernel))
    n, y, x = torch.nonzero(peaks, as_tuple=True)  # by image, raster order
    scores = heat[n, y, x]
    if n.numel() > top_k:  # else no image has more than top_k
        order = scores.argsort(descending=True, stable=True)
        order = order[n[order].argsort(stable=True)]  # by image, best first
        counts = torch.bincount(n, minlength=N)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[n[order]]
        keep = order[rank < top_k].sort().values  # back to image + raster order
        n, y, x, scores = n[keep], y[keep], x[keep], scores[keep]
    return n, torch.stack([y, x], 1), scores


# --------------------------------------------------------------------------------------------
# 3. pixel assignment
# --------------------------------------------------------------------------------------------
def assign_to_centers(
    pixel_centers: torch.Tensor,
    pixel_batch: torch.Tensor,
    centers: torch.Tensor,
    center_batch: torch.Tensor,
    num_images: int,
    chunk: int,
) -> torch.Tensor:
    """Nearest center (squared Euclidean distance) of each pixel's predicted center, among the
    centers of the pixel's image.

    Args:
        pixel_centers: [T, 2] float predicted centers ``(y + dy, x + dx)`` of T pixels.
        pixel_batch: [T] int64 image of each pixel.
        centers: [K, 2] centers (y, x); center_batch: [K] int64 image of each, sorted.
        num_images: N.
        chunk: pixels per chunk: memory is O(chunk x most centers of an image).

    Returns:
        [T] int64: index of the nearest center among its image's centers (in their order,
        the first on a tie); -1 where the image has no center.
    """
    T = pixel_centers.shape[0]
    device = pixel_centers.device
    out = torch.full((T,), -1, dtype=torch.long, device=device)
    counts = torch.bincount(center_batch, minlength=num_images)
    k_max = int(counts.max()) if num_images > 0 else 0
    if T == 0 or k_max == 0:
        return out
    starts = torch.cumsum(counts, 0) - counts
    # [N, k_max, 2] table of each image's centers, padded with +inf (never the nearest)
    table = pixel_centers.new_full((num_images, k_max, 2), float("inf"))
    rank = torch.arange(center_batch.numel(), device=device) - starts[center_batch]
    table[center_batch, rank] = centers.to(table.dtype)
    for s in range(0, T, chunk):
        p = pixel_centers[s : s + chunk]
        b = pixel_batch[s : s + chunk]
        b_lo, b_hi = int(b.min()), int(b.max())
        if b_lo == b_hi:  # one image (the usual case): its centers, no padding
            k = int(counts[b_lo])
            if k == 0:
                continue
            cy, cx = table[b_lo, :k, 0][None], table[b_lo, :k, 1][None]  # [1, k]
        else:
            rows = table[b]  # [chunk, k_max, 2]
            cy, cx = rows[..., 0], rows[..., 1]
        d = cy - p[:, 0:1]
        d = d.mul_(d)
        dx = cx - p[:, 1:2]
        d.add_(dx.mul_(dx))
        out[s : s + chunk] = torch.where(counts[b] > 0, d.argmin(1), -1)
    return out


# --------------------------------------------------------------------------------------------
# 4. instance scores
# --------------------------------------------------------------------------------------------
def center_instance_scores(
    sem_seg_logits: torch.Tensor,
    semantic: torch.Tensor,
    center_heatmap: torch.Tensor,
    center_batch: torch.Tensor,
    pixels: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    instance: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Score of each instance, as Detectron2's ``PanopticDeepLab`` scores its instances.

    ``score = heatmap(centroid) x mean_{pixels} softmax(logits)[class]``, where ``class`` is
    the majority class of the instance's (thing) pixels (smallest id on a tie, as
    ``fuse_panoptic``) and ``centroid = (floor(mean y), floor(mean x))`` of those pixels.
    Instances without a pixel score 0 (and a NaN heatmap value counts as 0).

    Args:
        sem_seg_logits: [N, C, H, W]; semantic: [N, H, W] labels (-1 = void);
        center_heatmap: [N, 1, H, W]; center_batch: [K] image of each instance (sorted).
        pixels: (n, y, x) [T] each, the assigned (thing) pixels; instance: [T] index of each
            pixel's instance among its image's instances (>= 0).
        chunk: pixels per chunk of the softmax normalizer (memory O(chunk x C)).

    Returns:
        [K] float32.
    """
    N, C = sem_seg_logits.shape[:2]
    device = sem_seg_logits.device
    K = center_batch.numel()
    pn, py, px = pixels
    counts = torch.bincount(center_batch, minlength=N)
    key = (torch.cumsum(counts, 0) - counts)[pn] + instance  # global instance index [T]
    votes = torch.bincount(key * C + semantic[pn, py, px], minlength=K * C).view(K, C)
    classes = votes.argmax(1)
    area = votes.sum(1)
    # softmax probability of the instance's class at each pixel, in chunks of [chunk, C];
    # non-finite logits count as the lowest finite value (see ``mask_nonfinite_logits``)
    low = torch.finfo(sem_seg_logits.dtype).min
    prob = torch.empty(pn.numel(), dtype=sem_seg_logits.dtype, device=device)
    for s in range(0, pn.numel(), chunk):
        logits = sem_seg_logits[pn[s : s + chunk], :, py[s : s + chunk], px[s : s + chunk]]
        logits = torch.nan_to_num(logits, nan=low, posinf=low, neginf=low)
        e = (logits - logits.amax(1, keepdim=True)).exp_()
        mine = e.gather(1, classes[key[s : s + chunk], None])[:, 0]
        prob[s : s + chunk] = mine / e.sum(1)
    prob_sum = torch.zeros(K, dtype=torch.float64, device=device)
    prob_sum.index_add_(0, key, prob.double())
    # centroid, floored exactly
    sum_y = torch.zeros(K, dtype=torch.long, device=device).index_add_(0, key, py)
    sum_x = torch.zeros(K, dtype=torch.long, device=device).index_add_(0, key, px)
    safe = area.clamp(min=1)
    objectness = center_heatmap[center_batch, 0, sum_y // safe, sum_x // safe].nan_to_num(0.0)
    scores = objectness.double() * prob_sum / safe
    return torch.where(area > 0, scores, 0.0).to(sem_seg_logits.dtype)


# --------------------------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------------------------
def center_instances(
    sem_seg_logits: torch.Tensor,
    semantic: torch.Tensor,
    thing_mask: torch.Tensor,
    center_heatmap: torch.Tensor,
    center_offsets: torch.Tensor,
    cfg: CenterPostProcessConfig,
) -> List[Dict[str, torch.Tensor]]:
    """Panoptic-DeepLab's instance stage (steps 2-4 above) of a batch of one valid size: the
    ``instance_fn`` of :func:`~deeperlab_d2.layers.post_processing.panoptic_inference`.

    Args:
        sem_seg_logits: [N, C, H, W] float32 (for the scores; may hold NaN/inf).
        semantic: [N, H, W] int64 labels (-1 = void); thing_mask: [N, H, W] bool, pixels whose
            label is a thing class.
        center_heatmap: [N, 1, H, W] (used as is: no sigmoid); center_offsets: [N, 2, H, W]
            (dy, dx) from each pixel to its instance center; float32.
        cfg: :class:`CenterPostProcessConfig` (``thing_area`` / ``stuff_area`` are the
            fusion's).

    Returns:
        per image ``instance_map`` [H, W] int64 (index into the centers, -1 = none: not a
        thing pixel, no center in the image, or no finite predicted center),
        ``instance_scores`` [J] float32 (:func:`center_instance_scores`) and
        ``instance_centers`` [J, 2] float32 (y, x) (integer values, raster order).
    """
    N, _, H, W = sem_seg_logits.shape
    device = sem_seg_logits.device
    center_batch, centers, _ = find_centers(
        center_heatmap, cfg.center_threshold, cfg.nms_kernel, cfg.top_k
    )
    pn, py, px = torch.nonzero(thing_mask, as_tuple=True)  # sorted by image
    pixel_centers = torch.stack([py, px], 1).to(center_offsets.dtype)
    pixel_centers += center_offsets[pn, :, py, px]
    finite = torch.isfinite(pixel_centers).all(1)
    if not bool(finite.all()):
        pn, py, px, pixel_centers = pn[finite], py[finite], px[finite], pixel_centers[finite]
    instance = assign_to_centers(pixel_centers, pn, centers, center_batch, N, cfg.assign_chunk)
    assigned = instance >= 0
    pn, py, px, instance = pn[assigned], py[assigned], px[assigned], instance[assigned]
    instance_map = torch.full((N, H, W), -1, dtype=torch.long, device=device)
    instance_map[pn, py, px] = instance
    scores = center_instance_scores(
        sem_seg_logits,
        semantic,
        center_heatmap,
        center_batch,
        (pn, py, px),
        instance,
        cfg.assign_chunk,
    )
    results = []
    start = 0
    for n, count in enumerate(torch.bincount(center_batch, minlength=N).tolist()):
        results.append(
            {
                "instance_map": instance_map[n],
                "instance_scores": scores[start : start + count],
                "instance_centers": centers[start : start + count].to(torch.float32),
            }
        )
        start += count
    return results


def panoptic_deeplab_inference(
    sem_seg_logits: torch.Tensor,
    center_heatmap: torch.Tensor,
    center_offsets: torch.Tensor,
    thing_ids: Sequence[int],
    cfg: CenterPostProcessConfig,
    image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[Dict[str, object]]:
    """Panoptic-DeepLab head outputs of a batch -> panoptic segmentation of each image.

    :func:`center_instances` inside the shared steps of
    :func:`~deeperlab_d2.layers.post_processing.panoptic_inference` (float32 cast, autocast off,
    cropping of padded images, NaN-safe semantic argmax, majority-vote fusion).

    Args:
        sem_seg_logits: [N, C, H, W] semantic logits (may hold NaN/inf: a pixel takes the
            argmax of its finite logits, void without any).
        center_heatmap: [N, 1, H, W] center heatmap, used as is (regressed with MSE, no
            sigmoid).
        center_offsets: [N, 2, H, W] offsets (dy, dx) from each pixel to its instance center,
            in pixels of this resolution.
            All three in any floating dtype: cast to float32, processed with autocast off.
        thing_ids: contiguous ids of thing classes.
        cfg: :class:`CenterPostProcessConfig`.
        image_sizes: optional (h, w) per image: only the top-left h x w part is valid
            (padding is cropped before any processing).

    Returns:
        per image a dict: ``panoptic`` [h, w] int32 (0 = void), ``segments_info`` (see
        :func:`fuse_panoptic`; instance classes by majority vote), ``semantic`` [h, w] int64
        (-1 = void), ``instance_centers`` [J, 2] float32 (y, x) (integer values; raster
        order), ``instance_scores`` [J] float32 (:func:`center_instance_scores`),
        ``instance_map`` [h, w] int64 (index into the centers, -1 = none). Thing pixels of an
        image without centers are void.
    """
    return panoptic_inference(
        sem_seg_logits,
        {"center_heatmap": center_heatmap, "center_offsets": center_offsets},
        functools.partial(center_instances, cfg=cfg),
        thing_ids,
        cfg,
        image_sizes,
    )
