"""Pure losses (hand-computed values) and seeded sparse click sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppd.baselines.mask_losses import bce_loss, dice_loss, dpo_loss, mask_log_likelihood
from ppd.data.points import PAD, pad_prompt_sets, sample_points, stem_generator


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_matches_hand_computed_value() -> None:
    # pair 1: margin = 0.5 * ((-1.0 + 2.0) - (-3.0 + 2.5)) = 0.5 * (1.0 + 0.5) = 0.75
    # pair 2: margin = 0.5 * ((-0.2 + 0.1) - (-0.4 + 0.9)) = 0.5 * (-0.1 - 0.5) = -0.3
    pi_w, ref_w = torch.tensor([-1.0, -0.2]), torch.tensor([-2.0, -0.1])
    pi_l, ref_l = torch.tensor([-3.0, -0.4]), torch.tensor([-2.5, -0.9])
    want = (-math.log(_sig(0.75)) - math.log(_sig(-0.3))) / 2
    got = dpo_loss(pi_w, ref_w, pi_l, ref_l, beta=0.5)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # equal policies: log 2
    z = torch.zeros(3)
    assert dpo_loss(z, z, z, z, beta=2.0).item() == pytest.approx(math.log(2.0))
    # weights select pairs; all-zero weights give 0 and still backpropagate
    w = torch.tensor([1.0, 0.0])
    assert dpo_loss(pi_w, ref_w, pi_l, ref_l, 0.5, weight=w).item() == pytest.approx(-math.log(_sig(0.75)))
    p = pi_w.clone().requires_grad_(True)
    loss = dpo_loss(p, ref_w, pi_l, ref_l, 0.5, weight=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and p.grad is not None


def test_dpo_loss_gradient_raises_winner_and_lowers_loser() -> None:
    pw = torch.tensor([-1.0], requires_grad=True)
    pl = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pw, torch.tensor([-1.0]), pl, torch.tensor([-1.0]), beta=1.0).backward()
    assert pw.grad.item() < 0 < pl.grad.item()  # descent increases pi_w, decreases pi_l
    # reference terms are constants
    rw = torch.tensor([-1.0], requires_grad=True)
    pw2 = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pw2, rw, torch.tensor([-1.0]), torch.tensor([-1.0]), 1.0).backward()
    assert rw.grad is None and pw2.grad is not None


def test_mask_log_likelihood_mean_sum_and_valid() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])  # (1, 2, 2)
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    per = [math.log(_sig(2.0)), math.log(_sig(-1.0)), math.log(_sig(0.0)), math.log(_sig(-3.0))]
    assert mask_log_likelihood(logits, y, reduction="sum").item() == pytest.approx(sum(per), rel=1e-6)
    assert mask_log_likelihood(logits, y).item() == pytest.approx(sum(per) / 4, rel=1e-6)
    valid = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert mask_log_likelihood(logits, y, valid).item() == pytest.approx((per[0] + per[2]) / 2, rel=1e-6)
    assert mask_log_likelihood(logits, y.bool(), valid, "sum").item() == pytest.approx(per[0] + per[2])
    with pytest.raises(ValueError, match="reduction"):
        mask_log_likelihood(logits, y, reduction="max")
    with pytest.raises(ValueError, match="shape"):
        mask_log_likelihood(logits, y[..., :1])


def test_bce_and_dice_hand_values() -> None:
    logits = torch.tensor([[[0.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0]]])
    want = (-math.log(0.5) - math.log(1 - _sig(2.0))) / 2
    assert bce_loss(logits, t).item() == pytest.approx(want, rel=1e-6)
    assert bce_loss(logits, t, torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(-math.log(0.5))
    p = torch.tensor([0.5, _sig(2.0)])
    inter, den = 0.5, p.sum().item() + 1.0
    assert dice_loss(logits, t, eps=0.0).item() == pytest.approx(1 - 2 * inter / den, rel=1e-6)
    # perfect confident prediction -> ~0; empty target and empty prediction -> 0 with eps
    big = torch.tensor([[[30.0, -30.0]]])
    assert dice_loss(big, t).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full((1, 2, 2), -50.0), torch.zeros(1, 2, 2)).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_sample_points_inside_outside_and_seeded() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 8:20] = True
    pts, lab = sample_points(mask, 3, 3, torch.Generator().manual_seed(1))
    assert pts.shape == (6, 2) and lab.tolist() == [1, 1, 1, 0, 0, 0]
    for (x, y), lb in zip(pts.long().tolist(), lab.tolist(), strict=True):
        assert mask[y, x] == bool(lb)  # (x, y) = (column, row)
    pts2, _ = sample_points(mask, 3, 3, torch.Generator().manual_seed(1))
    assert torch.equal(pts, pts2)
    pts3, _ = sample_points(mask, 3, 3, torch.Generator().manual_seed(2))
    assert not torch.equal(pts, pts3)
    assert len(set(map(tuple, pts[:3].tolist()))) == 3  # without replacement


def test_sample_points_fewer_when_region_small_or_empty() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    pts, lab = sample_points(mask, 3, 2)
    assert lab.tolist() == [1, 0, 0] and pts[0].tolist() == [0.0, 0.0]
    pts, lab = sample_points(np.zeros((4, 4), bool), 3, 3)
    assert lab.tolist() == [0, 0, 0]
    pts, lab = sample_points(np.ones((4, 4), bool), 0, 3)
    assert pts.shape == (0, 2) and lab.shape == (0,)
    with pytest.raises(ValueError, match="H, W"):
        sample_points(np.zeros((2, 2, 2), bool), 1, 1)


def test_pad_prompt_sets_and_stem_generator() -> None:
    a = (torch.ones(2, 2), torch.tensor([1, 0]))
    b = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    pts, lab = pad_prompt_sets([a, b])
    assert pts.shape == (2, 2, 2) and lab.tolist() == [[1, 0], [PAD, PAD]]
    g1, g2 = stem_generator(0, "img1"), stem_generator(0, "img1")
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert not torch.equal(
        torch.rand(3, generator=stem_generator(0, "img1")), torch.rand(3, generator=stem_generator(0, "img2"))
    )
    assert not torch.equal(
        torch.rand(3, generator=stem_generator(0, "a")), torch.rand(3, generator=stem_generator(1, "a"))
    )
