"""Losses and decoder building blocks on hand-built inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from deeperlab_d2.modeling.decoder import depth_to_space, space_to_depth
from deeperlab_d2.modeling.losses import (
    masked_l1_loss,
    weighted_bootstrapped_cross_entropy,
    weighted_sigmoid_cross_entropy,
)


def test_bootstrapped_ce_selects_exactly_top_k_and_applies_weights():
    torch.manual_seed(0)
    B, C, H, W = 2, 4, 5, 6
    logits = torch.randn(B, C, H, W, requires_grad=True)
    targets = torch.randint(0, C, (B, H, W))
    targets[0, 0, :] = 255  # 6 ignored pixels in image 0 -> 24 valid, K = ceil(3.6) = 4
    weights = torch.ones(B, H, W)
    weights[1, 2, 3] = 3.0
    loss = weighted_bootstrapped_cross_entropy(logits, targets, weights, 0.15, 255)

    ce = F.cross_entropy(logits.detach(), targets, ignore_index=255, reduction="none")
    expected, chosen = [], []
    for i in range(B):
        valid = targets[i] != 255
        k = math.ceil(int(valid.sum()) * 0.15)
        vals = ce[i][valid]
        idx = torch.nonzero(valid.flatten()).flatten()[vals.argsort(descending=True)[:k]]
        chosen.append(set(idx.tolist()))
        expected.append((ce[i].flatten()[idx] * weights[i].flatten()[idx]).sum() / k)
    assert [len(c) for c in chosen] == [4, 5]
    torch.testing.assert_close(loss, torch.stack(expected).mean())

    # gradients reach exactly the K selected pixels of each image
    loss.backward()
    touched = logits.grad.abs().sum(dim=1).flatten(1) > 0
    for i in range(B):
        assert set(torch.nonzero(touched[i]).flatten().tolist()) == chosen[i]


def test_bootstrapped_ce_weight_scales_a_selected_pixel():
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 1, 0, 0] = -5.0  # pixel 0 is by far the hardest (target 1)
    targets = torch.ones(1, 1, 10, dtype=torch.long)
    w = torch.ones(1, 1, 10)
    base = weighted_bootstrapped_cross_entropy(logits, targets, w, 0.1)  # K = 1: pixel 0 only
    w[0, 0, 0] = 3.0
    w[0, 0, 5] = 100.0  # not selected: no effect
    weighted = weighted_bootstrapped_cross_entropy(logits, targets, w, 0.1)
    torch.testing.assert_close(weighted, 3 * base)
    torch.testing.assert_close(base, F.cross_entropy(logits[..., :1], targets[..., :1]))


def test_bootstrapped_ce_all_ignored_and_bad_ratio():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.full((2, 4, 4), 255)
    loss = weighted_bootstrapped_cross_entropy(logits, targets, torch.ones(2, 4, 4))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable
    with pytest.raises(ValueError, match="top_k_ratio"):
        weighted_bootstrapped_cross_entropy(logits, targets, torch.ones(2, 4, 4), 0.0)


def test_sigmoid_ce_respects_weights():
    logits = torch.tensor([[[[0.0, 2.0]]]])
    targets = torch.tensor([[[[1.0, 0.0]]]])
    w = torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(
        weighted_sigmoid_cross_entropy(logits, targets, w), torch.tensor(math.log(2))
    )
    w = torch.tensor([[[1.0, 1.0]]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    torch.testing.assert_close(
        weighted_sigmoid_cross_entropy(logits, targets, w), torch.tensor(expected)
    )


def test_sigmoid_ce_focal_factor_by_hand():
    # p = sigmoid(0) = 0.5 on a positive: factor 0.5^2; p = sigmoid(2) on a negative: p_t = 1 - p
    logits = torch.tensor([[[[0.0, 2.0]]]])
    targets = torch.tensor([[[[1.0, 0.0]]]])
    w = torch.tensor([[[1.0, 1.0]]])
    p = 1 / (1 + math.exp(-2))
    expected = (0.25 * math.log(2) + p**2 * math.log(1 + math.exp(2))) / 2
    got = weighted_sigmoid_cross_entropy(logits, targets, w, focal_gamma=2.0)
    torch.testing.assert_close(got, torch.tensor(expected))
    # gamma 0 is the plain CE; confident right pixels weigh almost nothing with gamma > 0
    plain = weighted_sigmoid_cross_entropy(logits, targets, w)
    torch.testing.assert_close(weighted_sigmoid_cross_entropy(logits, targets, w, 0.0), plain)
    easy = torch.tensor([[[[8.0, -8.0]]]])
    assert weighted_sigmoid_cross_entropy(easy, targets, w, 2.0) < 1e-3 * float(
        weighted_sigmoid_cross_entropy(easy, targets, w)
    )


def test_masked_l1():
    pred = torch.zeros(1, 2, 2, 1, 3)
    target = torch.zeros(1, 2, 2, 1, 3)
    target[0, 0, :, 0, 0] = torch.tensor([3.0, -4.0])  # |dy| + |dx| = 7
    target[0, 1, :, 0, 2] = torch.tensor([100.0, 100.0])  # masked out below
    mask = torch.zeros(1, 2, 1, 3)
    mask[0, 0, 0, :2] = 1  # two supervised (pixel, field) pairs of field 0
    torch.testing.assert_close(
        masked_l1_loss(pred, target, mask, normalizer=7.0), torch.tensor(0.5)
    )
    shared = torch.tensor([[[1.0, 0.0, 0.0]]])  # [B, H, W] mask shared by both fields
    torch.testing.assert_close(masked_l1_loss(pred, target, shared, 1.0), torch.tensor(3.5))
    assert masked_l1_loss(pred, target, torch.zeros(1, 1, 3)).item() == 0.0


@pytest.mark.parametrize("block", [2, 4])
def test_space_to_depth_round_trip_non_square(block):
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    y = space_to_depth(x, block)
    assert y.shape == (2, 3 * block * block, 8 // block, 12 // block)
    # channel c * block^2 + i * block + j at (h, w) holds x[c, h * block + i, w * block + j]
    c, i, j, h, w = 2, 1, block - 1, 1, 2
    assert y[1, c * block * block + i * block + j, h, w] == x[1, c, h * block + i, w * block + j]
    assert torch.equal(depth_to_space(y, block), x)
