"""Greedy / epsilon-greedy / random roll-outs of an attacker or defender in a :class:`PromptEnv`.

Used by validation (trained vs random agents with the same number of actions), the evaluation rows and
inference (:func:`greedy_defence`, the one defence loop). Both take a :class:`~ppd.rl.agent.DQNAgent` (or a
bare Q-network, wrapped by :func:`~ppd.rl.agent.as_agent` into a dense agent) and select with
:meth:`~ppd.rl.agent.DQNAgent.select` on the environment's static graphs: the one Q path of training,
validation and inference (a :class:`~ppd.rl.agent.PygDQNAgent` runs the PyG reference instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ppd.env.prompt_env import PromptEnv
from ppd.env.roles import DEFEND, get_role
from ppd.rl.agent import DQNAgent, as_agent, random_actions
from ppd.types import POSITIVE


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
    agent: DQNAgent | nn.Module | None,
    role: str,
    image_ids: torch.Tensor,
    start: torch.Tensor,
    steps: torch.Tensor | int,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> RolloutResult:
    """Run one role for up to ``steps`` actions per episode (no learning), stepping the environment.

    Training roll-outs (the attacker's greedy result, epsilon-greedy and random baselines). The defender's
    Q <= 0 stopping rule is :func:`greedy_defence`, not an option here.

    Args:
        env: the environment (its batch state is overwritten).
        agent: the role's agent (or a bare Q-network, see :func:`~ppd.rl.agent.as_agent`), or ``None``
            (uniformly random valid actions).
        role: ``attack`` or ``defend``.
        image_ids: ``(B,)``.
        start: ``(B, N)`` start states.
        steps: per-episode action budget, int or ``(B,)``.
        epsilon: exploration probability.
        generator: RNG.

    Returns:
        :class:`RolloutResult`.
    """
    r = get_role(role)
    agent = None if agent is None else as_agent(agent, r)
    inputs = None if agent is None else agent.inputs(env)
    b = len(image_ids)
    budget = torch.as_tensor(steps, dtype=torch.long).expand(b).clone()
    start_dice = env.reset(image_ids, start, budget=budget)
    taken = torch.zeros(b, dtype=torch.long)
    while True:
        if agent is None:
            act = random_actions(r, env.status, generator)
        else:
            act = agent.select(inputs, env.image_ids, env.status, epsilon, generator)[0]
        live = ~env.done & (act >= 0)
        if not bool(live.any()):
            break
        env.step(r, act.clamp_min(0), live)
        taken += live.long()
    return RolloutResult(env.status.clone(), env.dice.clone(), start_dice, taken)


@dataclass
class DefenceTrace:
    """Result of :func:`greedy_defence` for B prompt states.

    Attributes:
        status: ``(B, N)`` final states.
        steps: ``(B,)`` deactivations performed.
        q_values: per episode, the best valid Q-value seen before each decision (``steps`` values, plus the
            final value that stopped the episode when it stopped by the Q rule).
        stop_reason: per episode ``"q<=0"``, ``"budget"``, ``"no_active_prompt"`` or ``"last_positive"``.
    """

    status: torch.Tensor
    steps: torch.Tensor
    q_values: list[list[float]]
    stop_reason: list[str]


@torch.no_grad()
def greedy_defence(
    env: PromptEnv,
    agent: DQNAgent | nn.Module,
    image_ids: torch.Tensor | Sequence[int],
    start: torch.Tensor,
    max_steps: int | None = None,
    keep_last_positive: bool = True,
    sam_inputs: bool = False,
    min_q: float = 0.0,
) -> DefenceTrace:
    """Greedy deactivation while the best Q-value is positive: THE defence loop of validation and inference.

    Stopping rule, checked per episode before each decision: the budget is used up (``"budget"``); no
    prompt is active (``"no_active_prompt"``); with ``keep_last_positive`` only the last positive prompt
    would be removable (``"last_positive"``); the best valid Q-value is ``<= 0`` or NaN (``"q<=0"``).

    The environment is only used for its observations (graph + node features); its batch state is not
    touched. SAM is called only with ``sam_inputs`` (one decode per live state and step, no GT needed).

    Args:
        env: environment holding the images' features.
        agent: the defender agent (or a bare defender Q-network, see :func:`~ppd.rl.agent.as_agent`).
        image_ids: ``(B,)`` image ids of ``env``.
        start: ``(B, N)`` start states (0 inactive, 1 positive, 2 negative).
        max_steps: step budget per image (``None`` = unlimited, i.e. at most the number of active prompts).
        keep_last_positive: never deactivate the last positive prompt (SAM without a positive point predicts
            background or noise; stop reason ``"last_positive"`` when nothing else is removable).
        sam_inputs: append SAM's current prediction to the node inputs (:meth:`PromptEnv.sam_features`),
            for defenders trained with them (``env_config["sam_inputs"]``); re-decoded after every removal.
        min_q: stop threshold: remove only while the best Q-value is ``> min_q`` (``"q<=0"`` stop reason
            either way); 0 is the plain rule, a higher value a more cautious defender (chosen on dev data and
            stored as ``env_config["min_q"]``).

    Returns:
        The :class:`DefenceTrace`.
    """
    agent = as_agent(agent, DEFEND)
    inputs = agent.inputs(env)
    ids = torch.as_tensor(image_ids, dtype=torch.long)
    status = start.long().clone()
    if status.dim() != 2 or status.shape != (len(ids), env.num_nodes):
        raise ValueError(f"start must be (B, N) = ({len(ids)}, {env.num_nodes}), got {tuple(status.shape)}")
    b = len(ids)
    steps = torch.zeros(b, dtype=torch.long)
    q_trace: list[list[float]] = [[] for _ in range(b)]
    reason = [""] * b
    live = torch.ones(b, dtype=torch.bool)
    while bool(live.any()):
        idx = live.nonzero().squeeze(1)
        for i in idx.tolist():  # budget / exhaustion checks before asking the network
            if max_steps is not None and int(steps[i]) >= max_steps:
                live[i], reason[i] = False, "budget"
            elif not bool((status[i] != 0).any()):
                live[i], reason[i] = False, "no_active_prompt"
        idx = live.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        st = status[idx]
        extra = env.sam_features(ids[idx], st) if sam_inputs else None
        mask = DEFEND.mask(st).reshape(len(idx), -1)  # (b, N)
        if keep_last_positive:
            pos = st == POSITIVE  # (b, N)
            mask = mask & ~(pos & (pos.sum(1) == 1)[:, None])  # not the positive of states with only one
            stuck = ~mask.any(1)
        act, val = agent.select(inputs, ids[idx], st, extra=extra, mask=mask)
        for j, i in enumerate(idx.tolist()):
            if keep_last_positive and bool(stuck[j]):
                live[i], reason[i] = False, "last_positive"
                continue
            v = float(val[j])
            q_trace[i].append(v)
            if not v > min_q:  # also catches NaN
                live[i], reason[i] = False, "q<=0"
                continue
            node = int(act[j])
            status[i, node] = 0
            steps[i] += 1
    return DefenceTrace(status=status, steps=steps, q_values=q_trace, stop_reason=reason)
