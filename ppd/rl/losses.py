"""Pure DQN loss helpers over per-graph quantities ``(B,)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ppd.env.roles import DEFEND, Role, get_role, wrong_labels
from ppd.models.qnet import batch_ptr, masked_argmax, masked_max

__all__ = [
    "td_target",
    "td_loss",
    "dqn_next_value",
    "double_dqn_next_value",
    "oracle_margin_loss",
    "AuxLoss",
    "counterfactual_regression_loss",
    "listwise_ranking_loss",
]


def td_target(reward: Tensor, done: Tensor, next_q_max: Tensor, gamma: float) -> Tensor:
    """One-step TD target ``r + gamma * max_a' Q(s', a')``, cut at terminal states.

    Where ``done`` is True or ``next_q_max == -inf`` (no valid next action) the target is ``reward``.

    Args:
        reward: ``(B,)``.
        done: ``(B,)`` bool.
        next_q_max: ``(B,)`` bootstrap value of the next state.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``(B,)`` detached targets.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"td_target: gamma must lie in [0, 1], got {gamma}")
    if not (reward.shape == done.shape == next_q_max.shape) or reward.dim() != 1:
        raise ValueError(
            f"td_target: reward, done, next_q_max must share shape (B,), got {tuple(reward.shape)}, "
            f"{tuple(done.shape)}, {tuple(next_q_max.shape)}"
        )
    reward = reward.detach()
    next_q_max = next_q_max.detach().to(reward.dtype)
    terminal = done.bool() | torch.isneginf(next_q_max)
    bootstrap = torch.where(terminal, torch.zeros_like(next_q_max), next_q_max)
    return reward + gamma * bootstrap


def td_loss(q_sa: Tensor, target: Tensor, huber: bool = True, delta: float = 1.0) -> Tensor:
    """Mean TD regression loss.

    Args:
        q_sa: ``(B,)`` Q-values of the taken actions (with grad).
        target: ``(B,)`` TD targets (treated as constants).
        huber: Huber (smooth L1 with threshold ``delta``) if True, else mean squared error.
        delta: Huber threshold.

    Returns:
        Scalar loss.
    """
    if q_sa.shape != target.shape:
        raise ValueError(f"td_loss: q_sa {tuple(q_sa.shape)} and target {tuple(target.shape)} differ")
    target = target.detach().to(q_sa.dtype)
    if huber:
        return F.huber_loss(q_sa, target, delta=delta)
    return F.mse_loss(q_sa, target)


def dqn_next_value(
    q_target_next: Tensor, mask_next: Tensor, batch_next: Tensor, num_graphs: int | None = None
) -> Tensor:
    """Vanilla DQN bootstrap ``max_{valid a'} Q_target(s', a')``.

    Args:
        q_target_next: ``(N_total, K)`` target-network Q-values on the next states.
        mask_next: ``(N_total, K)`` bool valid actions in the next states.
        batch_next: ``(N_total,)`` graph id per node.
        num_graphs: B.

    Returns:
        ``(B,)``; ``-inf`` where no action is valid.
    """
    return masked_max(q_target_next, mask_next, batch_next, num_graphs).detach()


def double_dqn_next_value(
    q_online_next: Tensor,
    q_target_next: Tensor,
    mask_next: Tensor,
    batch_next: Tensor,
    num_graphs: int | None = None,
) -> Tensor:
    """Double-DQN bootstrap ``Q_target(s', argmax_{valid a'} Q_online(s', a'))``.

    Args:
        q_online_next: ``(N_total, K)`` online-network Q-values on the next states (selects).
        q_target_next: ``(N_total, K)`` target-network Q-values (evaluates).
        mask_next: ``(N_total, K)`` bool valid actions.
        batch_next: ``(N_total,)`` graph id per node.
        num_graphs: B.

    Returns:
        ``(B,)`` detached; ``-inf`` where no action is valid.
    """
    if q_online_next.shape != q_target_next.shape:
        raise ValueError(
            f"double_dqn_next_value: online {tuple(q_online_next.shape)} and target "
            f"{tuple(q_target_next.shape)} Q shapes differ"
        )
    action, _ = masked_argmax(q_online_next.detach(), mask_next, batch_next, num_graphs)
    q_t = q_target_next.detach()
    q_t = q_t.unsqueeze(-1) if q_t.dim() == 1 else q_t
    k = q_t.size(1)
    ptr = batch_ptr(batch_next, action.numel())
    valid = action >= 0
    safe = action.clamp_min(0)
    # Graphs without a valid action point at a dummy node 0 here and are overwritten with -inf below.
    node = torch.where(valid, ptr[:-1] + torch.div(safe, k, rounding_mode="floor"), torch.zeros_like(safe))
    value = q_t[node, safe % k] if q_t.size(0) else torch.zeros(action.shape, dtype=q_t.dtype)
    return torch.where(valid, value, torch.full_like(value, float("-inf")))


def oracle_margin_loss(q: Tensor, status: Tensor, node_fg: Tensor, margin: float = 0.05) -> Tensor:
    """Large-margin auxiliary loss of the defender from the GT label oracle (DQfD-style, per node).

    For every *active* prompt the GT says whether its label is wrong (a positive outside the object or a
    negative inside it): removing it is a demonstrated good action, removing a right-label prompt a bad one.
    The loss pushes ``Q(s, remove i)`` above ``+margin`` for wrong prompts and below ``-margin`` for right
    ones (squared hinge), so the greedy ``Q <= 0`` stopping rule stops once only right-label prompts remain.
    Every decoded or undecoded state gives a target for all its active nodes, not one sparse ΔDice.

    Args:
        q: ``(S, N)`` defender Q-values.
        status: ``(S, N)`` prompt states (0 inactive, 1 positive, 2 negative).
        node_fg: ``(S, N)`` bool, GT mask at each node centre.
        margin: hinge margin (in reward units, ΔDice).

    Returns:
        Scalar loss: mean over active nodes (0 when no node is active).
    """
    if q.shape != status.shape or status.shape != node_fg.shape:
        raise ValueError(
            f"oracle_margin_loss: q, status, node_fg must share a shape, got "
            f"{tuple(q.shape)}, {tuple(status.shape)}, {tuple(node_fg.shape)}"
        )
    active = status != 0
    wrong = wrong_labels(status, node_fg)
    sign = torch.where(wrong, 1.0, -1.0).to(q.dtype)
    hinge = torch.relu(margin - sign * q) ** 2
    n = active.sum()
    if int(n) == 0:
        return q.sum() * 0.0
    return (hinge * active).sum() / n


@dataclass(frozen=True)
class AuxLoss:
    """The auxiliary loss added to the defender's TD loss (a typed option group, resolved once by
    :class:`ppd.tasks.ppd.PPDTask`; its YAML keys are ``model.init_args.oracle_margin_weight`` / ``oracle_margin``).

    Attributes:
        oracle_margin_weight: weight of :func:`oracle_margin_loss` on the defender's Q-values (0 = off = paper).
        oracle_margin: its hinge margin (ΔDice units).
    """

    oracle_margin_weight: float = 0.0
    oracle_margin: float = 0.05

    def __post_init__(self) -> None:
        for name in ("oracle_margin_weight", "oracle_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def applies_to(self, role: Role | str) -> bool:
        """Whether a role's updates add the loss (the defender's only, and only with a positive weight)."""
        return get_role(role) == DEFEND and self.oracle_margin_weight > 0

    def weighted(self, q: Tensor, status: Tensor, node_fg: Tensor) -> tuple[Tensor, Tensor]:
        """``(weighted loss, unweighted margin loss)`` on the defender's Q-values ``q (S, N)`` of states
        ``status (S, N)`` with the GT at the node centres ``node_fg (S, N)``."""
        margin = oracle_margin_loss(q, status, node_fg, self.oracle_margin)
        return self.oracle_margin_weight * margin, margin


def counterfactual_regression_loss(q: Tensor, rewards: Tensor) -> Tensor:
    """Mean squared error of ``Q(s, remove i)`` against the exact one-step ΔDice of every valid removal.

    Args:
        q: ``(B, N)`` defender Q-values.
        rewards: ``(B, N)`` exact rewards (:func:`ppd.rl.counterfactual.removal_rewards`), NaN = no action.

    Returns:
        Scalar loss (0 when no action is valid).
    """
    if q.shape != rewards.shape:
        raise ValueError(f"q {tuple(q.shape)} and rewards {tuple(rewards.shape)} must have the same shape")
    valid = ~torch.isnan(rewards)
    if not bool(valid.any()):
        return q.sum() * 0.0
    return F.mse_loss(q[valid], rewards[valid].to(q.dtype))


def listwise_ranking_loss(q: Tensor, rewards: Tensor, temperature: float = 0.02) -> Tensor:
    """ListNet-style ranking loss within each state: only the order of the removals matters to the argmax.

    Cross-entropy between ``softmax(rewards / T)`` and ``softmax(q / T)`` over each state's valid actions,
    averaged over the states with at least two valid actions.

    Args:
        q: ``(B, N)`` Q-values.
        rewards: ``(B, N)`` exact rewards, NaN = no action.
        temperature: ``T`` (ΔDice units; 0.02 makes a 0.05 gap a strong preference).

    Returns:
        Scalar loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = ~torch.isnan(rewards)
    rows = valid.sum(1) >= 2
    if not bool(rows.any()):
        return q.sum() * 0.0
    q, r, v = q[rows], rewards[rows].to(q.dtype), valid[rows]
    neg = torch.finfo(q.dtype).min
    target = torch.softmax(torch.where(v, r, torch.full_like(r, neg)) / temperature, dim=1)
    logp = torch.log_softmax(torch.where(v, q / temperature, torch.full_like(q, neg)), dim=1)
    return -(target * torch.where(v, logp, torch.zeros_like(logp))).sum(1).mean()
