"""One role's DQN agent and the one place a transition is produced.

:class:`DQNAgent` (shaped like cleanrl's ``dqn.py``) holds a role's online and target Q-networks and knows
how to act (:meth:`~DQNAgent.select`, :meth:`~DQNAgent.final_status`), learn (:meth:`~DQNAgent.td_loss`,
Double DQN, Huber) and sync (:meth:`~DQNAgent.sync`). Its observations are ``(image ids (B,), status (B, N))``
plus the environment's static per-image tensors (:meth:`~DQNAgent.inputs`, built once): the dense path of
:mod:`ppd.rl.dense_learner`. :class:`PygDQNAgent` has the same interface on the PyG reference
(:meth:`PromptEnv.observe` batches, :class:`~ppd.models.qnet.QNetwork`), for arbitrary graphs and tests; the
networks hold the same parameters either way, so checkpoints load into both.

:func:`collect_step` is THE transition: select -> step the environment -> mask -> done -> store. The training
step and the warm start of :class:`ppd.tasks.ppd.PPDTask` both run it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from ppd.env.prompt_env import PromptEnv
from ppd.env.roles import Role, get_role
from ppd.models.qnet import QNetwork, gather_action_q
from ppd.models.qnet_dense import DenseQNetwork
from ppd.rl.dense_learner import dense_td_loss, random_actions, roll_states, select_from_q
from ppd.rl.losses import double_dqn_next_value, dqn_next_value, td_loss, td_target
from ppd.rl.replay import ReplayBuffer

__all__ = [
    "DQNAgent",
    "PygDQNAgent",
    "as_agent",
    "build_agent",
    "random_actions",
    "collect_step",
    "Collected",
    "q_values",
    "role_mask",
]


def role_mask(batch: Batch, role: Role | str) -> Tensor:
    """Valid-action mask of a PyG observation batch: attacker ``(N_total, 2)``, defender ``(N_total, 1)``.

    :meth:`PromptEnv.observe` stores each role's mask (:meth:`ppd.env.roles.Role.node_mask`) as
    ``<role>_mask``.
    """
    r = get_role(role)
    return getattr(batch, f"{r.name}_mask").reshape(-1, r.outputs_per_node)


def q_values(qnet: nn.Module, batch: Batch) -> Tensor:
    """Per-node Q-values ``(N_total, K)`` of a PyG Q-network on an observation batch (the reference path)."""
    return qnet(batch.x, batch.edge_index, batch.edge_attr, batch.edge_type)


class DQNAgent(nn.Module):
    """A role's DQN: online + target Q-network on dense observations.

    Args:
        role: the :class:`~ppd.env.roles.Role` (or its name); its ``outputs_per_node`` must match the network.
        online: the online network (:class:`~ppd.models.qnet_dense.DenseQNetwork`).
        target: the target network (default: a frozen copy of ``online``).
        gamma: discount.
        double_dqn: Double-DQN bootstrap (online selects, target evaluates).
        huber: Huber (smooth L1) TD loss instead of MSE.
        shared_forward: one online forward over ``s`` and ``s'`` together (see :mod:`ppd.rl.dense_learner`).
    """

    def __init__(
        self,
        role: Role | str,
        online: nn.Module,
        target: nn.Module | None = None,
        gamma: float = 0.95,
        double_dqn: bool = True,
        huber: bool = True,
        shared_forward: bool = False,
    ) -> None:
        super().__init__()
        self.role = get_role(role)
        if getattr(online, "out_per_node", self.role.outputs_per_node) != self.role.outputs_per_node:
            raise ValueError(
                f"DQNAgent({self.role.name}): the network has {online.out_per_node} outputs per node, "
                f"the role needs {self.role.outputs_per_node}"
            )
        self.online = online
        self.target = target if target is not None else copy.deepcopy(online).requires_grad_(False)
        self.gamma, self.double_dqn, self.huber, self.shared_forward = (
            gamma,
            double_dqn,
            huber,
            shared_forward,
        )
        self._inputs_cache: tuple[Any, torch.device, Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.online.parameters()).device

    def inputs(self, env: PromptEnv) -> Any:
        """The observation inputs of ``env``'s image pool on the agent's device (built once per env/device)."""
        c = self._inputs_cache
        if c is None or c[0] is not env or c[1] != self.device:
            c = self._inputs_cache = (env, self.device, env.static_graphs().to(self.device))
        return c[2]

    @torch.no_grad()
    def q(
        self,
        inputs: Any,
        image_ids: Tensor,
        status: Tensor,
        target: bool = False,
        extra: Tensor | None = None,
    ) -> Tensor:
        """Q-values ``(B, N * K)`` (flat action layout) of B states, without gradients.

        Args:
            inputs: :meth:`inputs` of the environment.
            image_ids: ``(B,)``; status: ``(B, N)``.
            target: use the target network.
            extra: ``(B, N, F)`` state-dependent node inputs of networks trained with them (``sam_inputs``:
                :meth:`PromptEnv.sam_features`).
        """
        return self._q(self.target if target else self.online, inputs, image_ids, status, extra)

    def forward(self, inputs: Any, image_ids: Tensor, status: Tensor, extra: Tensor | None = None) -> Tensor:
        """Online Q-values ``(B, N * K)`` of B states WITH gradients (arguments as :meth:`q`), for losses
        other than :meth:`td_loss` (e.g. the counterfactual defender's regression + ranking fit)."""
        return self._q(self.online, inputs, image_ids, status, extra)

    def _q(
        self, net: nn.Module, inputs: Any, image_ids: Tensor, status: Tensor, extra: Tensor | None
    ) -> Tensor:
        """``(B, N * K)`` Q-values of ``net`` (the online or the target network) on the dense inputs."""
        dev = self.device
        ex = None if extra is None else extra.to(dev)
        return net.forward_dense(inputs, image_ids.to(dev), status.to(dev), extra=ex).flatten(1)

    def select(
        self,
        inputs: Any,
        image_ids: Tensor,
        status: Tensor,
        epsilon: float = 0.0,
        generator: torch.Generator | None = None,
        extra: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Epsilon-greedy actions ``(B,)`` (CPU, -1 where nothing is valid) and the best valid Q ``(B,)``.

        ``extra`` as :meth:`q`; ``mask`` narrows the valid actions (see :func:`select_from_q`).
        """
        q = self.q(inputs, image_ids, status, extra=extra)
        return select_from_q(q, status, self.role, epsilon, generator, mask)

    def final_status(
        self,
        inputs: Any,
        image_ids: Tensor,
        start: Tensor,
        budget: Tensor,
        epsilon: float = 0.0,
        generator: torch.Generator | None = None,
        random: bool = False,
    ) -> Tensor:
        """Final states ``(B, N)`` of a greedy / epsilon-greedy (``random``: uniformly random) roll-out.

        Actions depend only on the states, so no state is decoded and the environment is not touched.
        """
        if random:
            return roll_states(lambda st: random_actions(self.role, st, generator), self.role, start, budget)
        sel = lambda st: self.select(inputs, image_ids, st, epsilon, generator)[0]  # noqa: E731
        return roll_states(sel, self.role, start, budget)

    def td_loss(self, inputs: Any, sample: dict[str, Tensor], return_q: bool = False) -> tuple[Tensor, ...]:
        """TD loss (paper eq. 7) on a replay sample: ``(loss, mean Q(s, a))`` [+ ``q (S, N * K)`` with grads]."""
        return dense_td_loss(
            self.online,
            self.target,
            inputs,
            sample,
            self.role.name,
            self.gamma,
            double_dqn=self.double_dqn,
            huber=self.huber,
            shared_forward=self.shared_forward,
            return_q=return_q,
        )

    def sync(self) -> None:
        """Copy the online weights into the target network."""
        self.target.load_state_dict(self.online.state_dict())


class PygDQNAgent(DQNAgent):
    """:class:`DQNAgent` on the PyG reference path: inputs are the environment itself (``observe`` batches)."""

    def inputs(self, env: PromptEnv) -> PromptEnv:
        return env

    def _q(
        self, net: nn.Module, inputs: PromptEnv, image_ids: Tensor, status: Tensor, extra: Tensor | None
    ) -> Tensor:
        obs = inputs.observe(image_ids, status, extra).to(self.device)
        return q_values(net, obs).reshape(len(image_ids), -1)

    def td_loss(
        self, inputs: PromptEnv, sample: dict[str, Tensor], return_q: bool = False
    ) -> tuple[Tensor, ...]:
        dev = self.device
        obs = inputs.observe(sample["image_id"], sample["status"].long()).to(dev)
        nxt = inputs.observe(sample["image_id"], sample["next_status"].long()).to(dev)
        q = q_values(self.online, obs)
        q_sa = gather_action_q(q, obs.batch, sample["action"].to(dev), obs.ptr)
        with torch.no_grad():
            mask_next = role_mask(nxt, self.role.name)
            q_tgt_next = q_values(self.target, nxt)
            if self.double_dqn:
                next_v = double_dqn_next_value(q_values(self.online, nxt), q_tgt_next, mask_next, nxt.batch)
            else:
                next_v = dqn_next_value(q_tgt_next, mask_next, nxt.batch)
            target = td_target(sample["reward"].to(dev), sample["done"].to(dev), next_v, self.gamma)
        out = (td_loss(q_sa, target, huber=self.huber), q_sa.detach().mean())
        return (*out, q.reshape(len(sample["action"]), -1)) if return_q else out


def build_agent(role: Role | str, impl: str = "dense", **kwargs: Any) -> DQNAgent:
    """A fresh agent of a role.

    Args:
        role: the role or its name.
        impl: ``dense`` (:class:`DQNAgent` on :class:`~ppd.models.qnet_dense.DenseQNetwork`) or ``pyg``
            (:class:`PygDQNAgent` on :class:`~ppd.models.qnet.QNetwork`); same parameters either way.
        **kwargs: the network's (``in_dim``, ``hidden``, ``layers``, ``heads``, ``conv``) and the agent's
            (``gamma``, ``double_dqn``, ``huber``, ``shared_forward``) options; ``target=False``: no separate
            target network (the target is the online network itself, for fits without bootstrapping).
    """
    if impl not in ("dense", "pyg"):
        raise ValueError(f"qnet_impl must be 'dense' or 'pyg', got {impl!r}")
    r = get_role(role)
    agent_keys = ("gamma", "double_dqn", "huber", "shared_forward")
    td = {k: kwargs.pop(k) for k in agent_keys if k in kwargs}
    separate_target = kwargs.pop("target", True)
    net_cls, agent_cls = (DenseQNetwork, DQNAgent) if impl == "dense" else (QNetwork, PygDQNAgent)
    net = net_cls(out_per_node=r.outputs_per_node, **kwargs)
    return agent_cls(r, net, None if separate_target else net, **td)


def as_agent(model: DQNAgent | nn.Module, role: Role | str) -> DQNAgent:
    """The agent that acts with ``model`` for ``role``: ``model`` itself when it is an agent, else a dense
    :class:`DQNAgent` around a bare Q-network (a PyG :class:`~ppd.models.qnet.QNetwork` is copied into a
    :class:`~ppd.models.qnet_dense.DenseQNetwork` with the same weights; its target is the same network).

    Raises:
        ValueError: an agent of another role.
        TypeError: neither an agent nor a Q-network.
    """
    r = get_role(role)
    if isinstance(model, DQNAgent):
        if model.role.name != r.name:
            raise ValueError(f"as_agent: a {model.role.name} agent cannot act as the {r.name} role")
        return model
    if not isinstance(model, QNetwork):
        raise TypeError(f"as_agent: expected a DQNAgent or a QNetwork, got {type(model).__name__}")
    net = DenseQNetwork.from_qnetwork(model)
    return DQNAgent(r, net, target=net)


@dataclass
class Collected:
    """Result of :func:`collect_step`.

    Attributes:
        stored: transitions stored (episodes that acted).
        can_act: some episode is not done and has a valid action in its new state.
    """

    stored: int
    can_act: bool


def collect_step(
    env: PromptEnv,
    agent: DQNAgent | None,
    role: Role | str,
    buffer: ReplayBuffer,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> Collected:
    """One batched environment step of a role from the env's current states; stores the transitions.

    Every episode that is not done and has a valid action acts (``agent`` epsilon-greedy, or uniformly random
    when ``agent`` is ``None``); SAM judges the new states; a transition is done when its budget is used up or
    its new state leaves the role no valid action.

    Args:
        env: the environment with B running episodes.
        agent: the role's agent, or ``None`` for the random policy (warm start).
        role: the acting role.
        buffer: the role's replay buffer.
        epsilon: exploration probability.
        generator: RNG of the exploration / random actions.
    """
    role = get_role(role)
    if agent is None:
        actions = random_actions(role, env.status, generator)
    else:
        actions = agent.select(agent.inputs(env), env.image_ids, env.status, epsilon, generator)[0]
    live = ~env.done & (actions >= 0)
    if not bool(live.any()):
        return Collected(0, bool((~env.done & role.mask(env.status).any(1)).any()))
    before = env.status.clone()
    res = env.step(role, actions.clamp_min(0), live)
    next_mask = role.mask(env.status)
    done = res.done | ~next_mask.any(1)
    idx = live.nonzero().squeeze(1)
    buffer.add_batch(
        env.image_ids[idx], before[idx], actions[idx], res.reward[idx], env.status[idx], done[idx]
    )
    return Collected(len(idx), bool((~env.done & next_mask.any(1)).any()))
