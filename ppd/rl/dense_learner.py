"""Fast DQN learner and action selection on :class:`~ppd.models.qnet_dense.DenseGraphs` observations.

Drop-in for the PyG path of :class:`ppd.tasks.ppd.PPDTask` (``qnet_impl: dense``): the same TD loss
(:mod:`ppd.rl.losses`), the same action-selection random streams as :func:`ppd.rl.rollout.select_actions`,
but observations are ``(image ids, status)`` plus the environment's static per-image tensors, and the
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
    "dense_select_actions",
    "greedy_final_status",
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


def dense_select_actions(
    qnet: DenseQNetwork | None,
    graphs: DenseGraphs,
    image_ids: Tensor,
    status: Tensor,
    role: str,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract and random draws as :func:`ppd.rl.rollout.select_actions`, without a PyG batch.

    Args:
        qnet: the role's network or ``None`` (uniformly random valid actions).
        graphs: static inputs (on the network's device).
        image_ids: ``(B,)``; status: ``(B, N)``.
        role: ``attack`` or ``defend``.
        epsilon: exploration probability.
        generator: RNG.

    Returns:
        ``actions (B,)`` on the CPU (-1 where nothing is valid), ``values (B,)`` (NaN for the random policy).
    """
    if qnet is None:
        act = random_actions(role, status, generator)
        return act, torch.full(act.shape, float("nan"))
    dev = graphs.x_static.device
    with torch.no_grad():
        q = qnet.forward_dense(graphs, image_ids.to(dev), status.to(dev))
    return select_from_q(q, status, role, epsilon, generator)


def select_from_q(
    q: Tensor,
    status: Tensor,
    role: Role | str,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Epsilon-greedy valid actions from the Q-values ``(B, N * K)`` (or ``(B, N, K)``) of B states ``(B, N)``.

    The draws of :func:`ppd.rl.rollout.select_actions` (one epsilon-greedy rule for every Q path).

    Returns:
        ``actions (B,)`` on the CPU (-1 where nothing is valid) and the best valid Q ``values (B,)``.
    """
    b, n = status.shape
    kk = get_role(role).outputs_per_node
    mask = get_role(role).mask(status).reshape(b * n, kk)
    batch = torch.arange(b).repeat_interleave(n)
    q = q.reshape(b * n, kk).cpu()
    if epsilon > 0:
        act = epsilon_greedy(q, mask, batch, epsilon, generator, b)
        _, val = masked_argmax(q, mask, batch, b)
        return act, val
    return masked_argmax(q, mask, batch, b)


def greedy_final_status(
    qnet: DenseQNetwork | None,
    graphs: DenseGraphs,
    image_ids: Tensor,
    start: Tensor,
    budget: Tensor,
    role: str = "attack",
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Final states of a greedy (or epsilon-greedy / random) roll-out, without decoding any state.

    The actions depend only on the states (not on rewards), so the final states equal those of
    ``ppd.rl.rollout.rollout(env, qnet, role, image_ids, start, budget, epsilon, generator)`` while SAM is
    never called; the caller decodes only the final states (``env.reset``).

    Args:
        qnet: the role's network, or ``None`` for uniformly random valid actions.
        graphs: static inputs.
        image_ids: ``(B,)``; start: ``(B, N)``; budget: ``(B,)`` action budgets.
        role: ``attack`` or ``defend``.
        epsilon: exploration probability (epsilon-greedy roll-out).
        generator: RNG of the random actions.

    Returns:
        ``(B, N)`` final states.
    """
    sel = lambda st: dense_select_actions(qnet, graphs, image_ids, st, role, epsilon, generator)[0]  # noqa: E731
    return roll_states(sel, role, start, budget)


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
