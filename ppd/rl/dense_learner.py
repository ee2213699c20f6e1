"""Fast DQN learner and action selection on :class:`~ppd.models.qnet_dense.DenseGraphs` observations.

The dense path of :class:`ppd.rl.agent.DQNAgent`: the same TD loss (:mod:`ppd.rl.losses`) as the PyG
reference, one action-selection rule for every Q path (:func:`select_from_q`), but observations are ``(image ids, status)`` plus the environment's static per-image tensors, and the
Q-network runs :meth:`~ppd.models.qnet_dense.DenseQNetwork.forward_dense`.

Per update the first layer's status-independent part is computed once for the batch's distinct images
and shared (detached) by the no-grad online forward on ``s'`` (Double DQN); ``shared_forward=True``
instead runs the online network once over ``s`` and ``s'`` concatenated (one call, but its backward also
runs through the ``s'`` half; ``experiments/benchmarks/train_throughput.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppd.env.roles import Role, get_role
from ppd.models.qnet import epsilon_greedy, masked_argmax, random_valid_action
from ppd.models.qnet_dense import DenseGraphs, DenseQNetwork, dense_masked_argmax, dense_masked_max
from ppd.rl.losses import td_loss, td_target

__all__ = [
    "dense_td_loss",
    "random_actions",
    "roll_states",
    "select_from_q",
]


def dense_td_loss(
    online: DenseQNetwork,
    target: DenseQNetwork,
    graphs: DenseGraphs,
    sample: dict[str, Tensor],
    role: str,
    gamma: float,
    double_dqn: bool = True,
    huber: bool = True,
    shared_forward: bool = False,
    return_q: bool = False,
) -> tuple[Tensor, ...]:
    """TD loss (paper eq. 7) of one role on a compact replay sample.

    Args:
        online: the role's online network (gets gradients).
        target: the role's target network.
        graphs: static inputs of the image pool, on the networks' device.
        sample: replay sample (``image_id (S,)``, ``status (S, N)``, ``action (S,)``, ``reward (S,)``,
            ``next_status (S, N)``, ``done (S,)``), any device.
        role: ``attack`` or ``defend``.
        gamma: discount.
        double_dqn: Double-DQN bootstrap (online selects, target evaluates).
        huber: Huber instead of MSE.
        shared_forward: one online forward over ``s`` and ``s'`` together (see the module docstring).
        return_q: also return the online Q-values of ``s``, ``(S, N * K)`` with gradients (for auxiliary
            losses on the same forward).

    Returns:
        ``(loss, mean Q(s, a))``, plus ``q (S, N * K)`` with ``return_q``.
    """
    dev = graphs.x_static.device
    ids = sample["image_id"].to(dev).long()
    s = sample["status"].to(dev).long()
    s2 = sample["next_status"].to(dev).long()
    action = sample["action"].to(dev).long()
    b = ids.shape[0]
    pre = online.precompute(graphs, ids)
    q_next_online: Tensor | None = None
    if double_dqn and shared_forward:
        q_all = online.forward_dense(graphs, torch.cat([ids, ids]), torch.cat([s, s2]), pre=pre)
        q, q_next_online = q_all[:b].flatten(1), q_all[b:].detach().flatten(1)
    else:
        q = online.forward_dense(graphs, ids, s, pre=pre).flatten(1)
    if bool(((action < 0) | (action >= q.shape[1])).any()):
        raise ValueError(f"dense_td_loss: actions must lie in [0, {q.shape[1]})")
    q_sa = q.gather(1, action[:, None]).squeeze(1)
    with torch.no_grad():
        mask_next = get_role(role).mask(s2)
        q_tgt = target.forward_dense(graphs, ids, s2).flatten(1)
        if double_dqn:
            if q_next_online is None:
                q_next_online = online.forward_dense(graphs, ids, s2, pre=pre.detach()).flatten(1)
            a_next, _ = dense_masked_argmax(q_next_online, mask_next)
            v = q_tgt.gather(1, a_next.clamp_min(0)[:, None]).squeeze(1)
            next_v = torch.where(a_next >= 0, v, torch.full_like(v, float("-inf")))
        else:
            next_v = dense_masked_max(q_tgt, mask_next)
        tgt = td_target(sample["reward"].to(dev), sample["done"].to(dev), next_v, gamma)
    out = (td_loss(q_sa, tgt, huber=huber), q_sa.detach().mean())
    return (*out, q) if return_q else out


def random_actions(role: Role | str, status: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniformly random valid flat actions ``(B,)`` of B states ``(B, N)`` (-1 where none is valid)."""
    r = get_role(role)
    b, n = status.shape
    mask = r.mask(status).reshape(b * n, r.outputs_per_node)
    return random_valid_action(mask, torch.arange(b).repeat_interleave(n), generator, b)


def select_from_q(
    q: Tensor,
    status: Tensor,
    role: Role | str,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Epsilon-greedy valid actions from the Q-values ``(B, N * K)`` (or ``(B, N, K)``) of B states ``(B, N)``.

    THE action-selection rule of every agent and Q path (:meth:`ppd.rl.agent.DQNAgent.select`).

    Args:
        q: Q-values of the B states (any device).
        status: ``(B, N)`` states.
        role: the acting role (its action mask).
        epsilon: exploration probability.
        generator: RNG of the exploration draws.
        mask: valid actions ``(B, N * K)`` (or ``(B, N, K)``), default the role's mask of ``status``
            (the defence loop narrows it to protect the last positive prompt).

    Returns:
        ``actions (B,)`` on the CPU (-1 where nothing is valid) and the best valid Q ``values (B,)``.
    """
    b, n = status.shape
    kk = get_role(role).outputs_per_node
    mask = (get_role(role).mask(status) if mask is None else mask).reshape(b * n, kk).cpu()
    batch = torch.arange(b).repeat_interleave(n)
    q = q.reshape(b * n, kk).cpu()
    if epsilon > 0:
        act = epsilon_greedy(q, mask, batch, epsilon, generator, b)
        _, val = masked_argmax(q, mask, batch, b)
        return act, val
    return masked_argmax(q, mask, batch, b)


def roll_states(
    select: Callable[[Tensor], Tensor], role: Role | str, start: Tensor, budget: Tensor | int
) -> Tensor:
    """Final states of a roll-out whose actions depend only on the states (so no state is decoded).

    Args:
        select: ``status (B, N) -> actions (B,)`` (-1 where nothing is valid), called once per step.
        role: the acting role (its step rule :meth:`~ppd.env.roles.Role.apply`).
        start: ``(B, N)`` start states; budget: ``(B,)`` or int action budgets.

    Returns:
        ``(B, N)`` final states.
    """
    status = start.long().clone()
    steps = torch.zeros(len(status), dtype=torch.long)
    budget = torch.as_tensor(budget, dtype=torch.long).expand(len(status))
    while True:
        act = select(status)
        live = (steps < budget) & (act >= 0)
        if not bool(live.any()):
            return status
        status = get_role(role).apply(status, act.clamp_min(0), live, check=False)
        steps += live.long()
