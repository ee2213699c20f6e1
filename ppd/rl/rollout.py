"""Greedy / epsilon-greedy / random roll-outs of an attacker or defender in a :class:`PromptEnv`.

Used by training (the attacker's greedy result becomes the defender's start), validation (trained vs
random agents with the same number of actions) and inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.data import Batch

from ppd.env.prompt_env import PromptEnv
from ppd.models.qnet import epsilon_greedy, masked_argmax, random_valid_action

ROLES = ("attack", "defend")


def role_mask(batch: Batch, role: str) -> torch.Tensor:
    """Valid-action mask of a PyG observation batch: attacker ``(N_total, 2)``, defender ``(N_total, 1)``."""
    if role == "attack":
        return batch.attack_mask
    if role == "defend":
        return batch.defend_mask.unsqueeze(-1)
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def q_values(qnet: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-node Q-values ``(N_total, K)`` of a Q-network on an observation batch."""
    return qnet(batch.x, batch.edge_index, batch.edge_attr, batch.edge_type)


def select_actions(
    qnet: nn.Module | None,
    batch: Batch,
    role: str,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one action per graph.

    Args:
        qnet: Q-network, or ``None`` for a uniformly random policy over valid actions.
        batch: observation batch of B graphs.
        role: ``attack`` or ``defend``.
        epsilon: exploration probability (ignored when ``qnet`` is None).
        generator: RNG.

    Returns:
        ``actions (B,)`` (graph-local flat index ``node * K + k``; -1 where nothing is valid) and
        ``values (B,)`` (max valid Q, NaN for the random policy).
    """
    mask = role_mask(batch, role)
    if qnet is None:
        act = random_valid_action(mask, batch.batch, generator)
        return act, torch.full(act.shape, float("nan"))
    with torch.no_grad():
        q = q_values(qnet, batch)
    if epsilon > 0:
        act = epsilon_greedy(q, mask, batch.batch, epsilon, generator)
        _, val = masked_argmax(q, mask, batch.batch)
        return act, val
    return masked_argmax(q, mask, batch.batch)


@dataclass
class RolloutResult:
    """Result of a roll-out.

    Attributes:
        status: ``(B, N)`` final prompt states.
        dice: ``(B,)`` final low-res Dice.
        start_dice: ``(B,)`` Dice of the start states.
        actions_taken: ``(B,)`` number of actions each episode took.
    """

    status: torch.Tensor
    dice: torch.Tensor
    start_dice: torch.Tensor
    actions_taken: torch.Tensor


def rollout(
    env: PromptEnv,
    qnet: nn.Module | None,
    role: str,
    image_ids: torch.Tensor,
    start: torch.Tensor,
    steps: torch.Tensor | int,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    stop_when_q_negative: bool = False,
) -> RolloutResult:
    """Run one role for up to ``steps`` actions per episode (no learning).

    Args:
        env: the environment (its batch state is overwritten).
        qnet: the role's Q-network or ``None`` (random valid actions).
        role: ``attack`` or ``defend``.
        image_ids: ``(B,)``.
        start: ``(B, N)`` start states.
        steps: per-episode action budget, int or ``(B,)``.
        epsilon: exploration probability.
        generator: RNG.
        stop_when_q_negative: stop an episode once its best valid Q-value is ``<= 0`` (the defender's
            inference stopping rule: only deactivate while a positive return is expected).

    Returns:
        :class:`RolloutResult`.
    """
    b = len(image_ids)
    budget = torch.as_tensor(steps, dtype=torch.long).expand(b).clone()
    start_dice = env.reset(image_ids, start, budget=budget)
    taken = torch.zeros(b, dtype=torch.long)
    while True:
        obs = env.observe()
        act, val = select_actions(qnet, obs, role, epsilon, generator)
        live = ~env.done & (act >= 0)
        if stop_when_q_negative and qnet is not None:
            live &= val > 0
        if not bool(live.any()):
            break
        act = act.clamp_min(0)
        if role == "attack":
            env.step_attack(act, live)
        else:
            env.step_defend(act, live)
        taken += live.long()
    return RolloutResult(env.status.clone(), env.dice.clone(), start_dice, taken)
