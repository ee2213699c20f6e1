"""Issue-11 levers of the defender: label-oracle margin loss, label-oracle ceiling, start-state mixture."""

from __future__ import annotations

import pytest
import torch

from ppd.eval.methods.oracle import label_oracle_removal
from ppd.rl.losses import oracle_margin_loss
from ppd.tasks.ppd import PPDTask


def test_oracle_margin_loss_matches_hand_computed_value() -> None:
    # nodes: 0 inactive, 1 right positive, 2 wrong positive, 3 right negative, 4 wrong negative
    status = torch.tensor([[0, 1, 1, 2, 2]])
    fg = torch.tensor([[True, True, False, False, True]])
    q = torch.tensor([[5.0, 0.02, 0.01, -0.10, 0.20]])
    m = 0.05
    # right -> want q <= -m: relu(m + q)^2 ; wrong -> want q >= m: relu(m - q)^2 ; inactive ignored
    want = ((m + 0.02) ** 2 + (m - 0.01) ** 2 + max(0.0, m - 0.10) ** 2 + max(0.0, m - 0.20) ** 2) / 4
    got = oracle_margin_loss(q, status, fg, m)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # gradients flow to active nodes only and point the right way
    qq = q.clone().requires_grad_(True)
    oracle_margin_loss(qq, status, fg, m).backward()
    g = qq.grad[0]
    assert g[0] == 0 and g[1] > 0 and g[2] < 0  # right positive pushed down, wrong positive pushed up
    assert g[3] == 0 and g[4] == 0  # already beyond their margins


def test_oracle_margin_loss_without_active_nodes_is_zero_and_checks_shapes() -> None:
    q = torch.randn(2, 4, requires_grad=True)
    loss = oracle_margin_loss(q, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="share a shape"):
        oracle_margin_loss(q, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))


def test_label_oracle_removes_wrong_labels_and_keeps_a_positive() -> None:
    fg = torch.tensor([True, True, False, False, True, False])
    start = torch.tensor([1, 2, 1, 2, 0, 0])  # right pos, wrong neg, wrong pos, right neg
    assert label_oracle_removal(start, fg).tolist() == [1, 0, 0, 2, 0, 0]
    only_wrong = torch.tensor([0, 0, 1, 1, 0, 2])  # both positives on background
    assert label_oracle_removal(only_wrong, fg).tolist() == [0, 0, 1, 0, 0, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"defence_starts": {"greedy": 1.0, "fm": 1.0}}, "unknown"),
        ({"defence_starts": {"greedy": -1.0}}, "non-negative"),
        ({"defence_starts": {"greedy": 0.0}}, "positive sum"),
        ({"defend_budget": "all"}, "defend_budget"),
        ({"updates_per_step": 0}, "updates_per_step"),
        ({"inference_max_steps": -1}, "inference_max_steps"),
    ],
)
def test_bad_lever_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PPDTask(feature_dim=53, hidden=8, layers=1, heads=1, **kwargs)
