"""Losses (SPEC §3, §5): weighted bootstrapped CE, sigmoid CE heatmaps, masked L1 offsets, and
Panoptic-DeepLab's weighted MSE center heatmap."""

import torch
import torch.nn.functional as F


def weighted_bootstrapped_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    top_k_ratio: float = 0.15,
    ignore_label: int = 255,
) -> torch.Tensor:
    """Per-image bootstrapped cross-entropy with pixel weights.

    For every image, the per-pixel CE of its ``N`` valid (non-ignored) pixels is ranked and only
    the ``K = ceil(top_k_ratio * N)`` largest are kept ("hard" pixels, ranked by their unweighted
    CE); the image's loss is ``sum(weight * CE over those K) / K``. The batch loss is the mean over
    images with ``N > 0`` (0 if none).

    Args:
        logits: float [B, C, H, W].
        targets: int64 [B, H, W], ``ignore_label`` where ignored.
        weights: float [B, H, W] pixel weights.
        top_k_ratio: fraction of valid pixels kept, in (0, 1].
        ignore_label: label of ignored pixels.

    Returns:
        scalar tensor.
    """
    if not 0.0 < top_k_ratio <= 1.0:
        raise ValueError(f"top_k_ratio must be in (0, 1], got {top_k_ratio}")
    B = logits.shape[0]
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_label, reduction="none").view(B, -1)
    valid = (targets != ignore_label).view(B, -1)
    num_valid = valid.sum(dim=1)
    k = torch.ceil(num_valid.to(torch.float64) * top_k_ratio).to(torch.int64)
    # Ignored pixels rank last: CE >= 0 for valid pixels.
    ranked, order = torch.sort(ce.masked_fill(~valid, -1.0), dim=1, descending=True)
    keep = torch.arange(ce.shape[1], device=ce.device)[None, :] < k[:, None]
    w = torch.gather(weights.reshape(B, -1).to(ce.dtype), 1, order)
    per_image = (ranked * w * keep).sum(dim=1) / k.clamp(min=1).to(ce.dtype)
    has_pixels = num_valid > 0
    if not bool(has_pixels.any()):
        return logits.sum() * 0.0
    return per_image[has_pixels].mean()


def weighted_sigmoid_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Sigmoid CE averaged over weighted pixels, optionally focal.

    Args:
        logits: float [B, P, H, W].
        targets: float [B, P, H, W] in [0, 1].
        weights: float [B, H, W] (shared by all channels) or [B, P, H, W].
        focal_gamma: each pixel's CE is multiplied by ``(1 - p_t)^focal_gamma``, ``p_t`` the
            probability given to its target (``p t + (1 - p)(1 - t)``, Lin et al.'s focal
            loss without the alpha balance); 0 = plain sigmoid CE.

    Returns:
        ``sum(w * m * bce) / sum(w)`` over all channels, ``m`` the focal factor (1 for gamma 0;
        0 if all weights are 0).
    """
    if weights.dim() == 3:
        weights = weights[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        bce = bce * (1 - p_t).pow(focal_gamma)
    return (bce * weights).sum() / weights.sum().clamp(min=1.0)


def masked_l1_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalizer: float = 1.0
) -> torch.Tensor:
    """L1 between offset fields on a mask, offsets divided by ``normalizer``.

    Args:
        pred, target: float [B, K, 2, H, W], (dy, dx) in pixels.
        mask: [B, K, H, W] or [B, H, W] (shared by the K fields); nonzero = supervised.
        normalizer: offsets are divided by it before the L1.

    Returns:
        mean over supervised (pixel, field) pairs of ``|dy| + |dx|`` (0 if the mask is empty).
    """
    if mask.dim() == 3:
        mask = mask[:, None].expand(pred.shape[0], pred.shape[1], *mask.shape[1:])
    mask = mask.to(pred.dtype)
    l1 = (pred - target).abs().sum(dim=2) / normalizer
    return (l1 * mask).sum() / mask.sum().clamp(min=1.0)


def weighted_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Squared error averaged over weighted pixels (Panoptic-DeepLab's center heatmap loss).

    Args:
        pred, target: float [B, K, H, W].
        weights: float [B, H, W] (shared by the K channels).

    Returns:
        ``sum(w * (pred - target)^2) / sum(w)`` (0 if all weights are 0).
    """
    w = weights[:, None].to(pred.dtype)
    return (((pred - target) ** 2) * w).sum() / w.sum().clamp(min=1.0)
