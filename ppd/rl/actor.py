"""The acting side of PPD training (paper Algorithm 1) as a plain class: episodes, phases, budgets, starts.

An episode on B images of the training pool:

1. *attack phase*: from the ideal prompts the attacker acts epsilon-greedily for the episode's step budget
   (budgets ~ U(budget_range) from a generator seeded by (seed, episode): equal on every DDP rank, so all
   ranks change phase together);
2. the defence start of each image is drawn from the :class:`DefenceStarts` mixture: the attacker's greedy
   result on the ideal prompts (paper), its epsilon-greedy or a random attacker's result, or one-shot
   feature-matching prompts;
3. *defence phase*: the defender acts epsilon-greedily for the budget (the attack budget, or with
   ``budget: active`` the number of active start prompts).

Each :meth:`Actor.step` is one :func:`~ppd.rl.agent.collect_step` of the current phase into the Actor's
replay buffers (:meth:`Actor.setup_buffers`; the learner draws from them with :meth:`Actor.sample`, on the
Actor's own sampling RNG); target networks are synced every ``target_sync_every`` stepping calls (global
counter). The Actor knows nothing of Lightning: :class:`ppd.tasks.ppd.PPDTask` calls it, logs what it
reports and checkpoints :meth:`Actor.state_dict` (with the buffers when ``save_buffers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ppd.env.prompt_env import PromptEnv
from ppd.rl.agent import DQNAgent, collect_step
from ppd.rl.replay import ReplayBuffer
from ppd.types import ROLES

__all__ = ["START_KINDS", "DefenceStarts", "Actor", "ActorStep", "warm_start"]

#: kinds of defence-phase start states
START_KINDS = ("greedy", "epsilon", "random", "feature_matching")
#: ``defend_budget`` choices
BUDGETS = ("attack", "active")


@dataclass(frozen=True)
class DefenceStarts:
    """Where the defence phase starts: a mixture of start kinds and the defender's budget.

    Attributes:
        weights: non-negative weights of :data:`START_KINDS` (normalised; drawn per episode slot). Default
            ``{greedy: 1}`` (paper-faithful: no draw at all).
        epsilon: exploration rate of the ``epsilon`` starts.
        budget: ``attack`` (the attacker's step budget, paper) or ``active`` (the number of active start prompts).
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"greedy": 1.0})
    epsilon: float = 0.3
    budget: str = "attack"

    def __post_init__(self) -> None:
        w = {k: float(v) for k, v in dict(self.weights or {"greedy": 1.0}).items()}
        bad = sorted(set(w) - set(START_KINDS))
        if bad or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ValueError(
                f"defence_starts {w}: expected non-negative weights of {list(START_KINDS)} "
                f"with a positive sum (unknown: {bad})"
            )
        if self.budget not in BUDGETS:
            raise ValueError(f"defend_budget must be 'attack' or 'active', got {self.budget!r}")
        object.__setattr__(self, "weights", w)

    @property
    def names(self) -> list[str]:
        """Kinds with a positive weight, in :data:`START_KINDS` order."""
        return [k for k in START_KINDS if self.weights.get(k, 0.0) > 0]

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n,)`` index into :attr:`names` per slot (no draw for the paper's ``{greedy}``)."""
        if self.names == ["greedy"]:  # keeps older runs' random streams
            return torch.zeros(n, dtype=torch.long)
        w = torch.tensor([self.weights[k] for k in self.names])
        return torch.multinomial(w, n, replacement=True, generator=generator)


@dataclass
class ActorStep:
    """What one :meth:`Actor.step` did.

    Attributes:
        stored: transitions stored.
        ended: the phase that ended in this step (``attack`` / ``defend``), else ``None``.
        change: ``(B,)`` the ended phase's Dice change, start minus end for ``attack`` (the attacker's drop),
            end minus start for ``defend`` (the defender's gain).
        episode: the episode the step belonged to.
    """

    stored: int
    ended: str | None = None
    change: Tensor | None = None
    episode: int = 0


class Actor:
    """Runs PPD episodes in a :class:`PromptEnv` and fills the role's replay buffers.

    Args:
        agents: ``{"attack": DQNAgent, "defend": DQNAgent}``.
        starts: the :class:`DefenceStarts`.
        seed: seed of the episode images, exploration and start draws; budgets use ``(seed, episode)``.
        target_sync_every: stepping calls between target-network syncs.
        feature_matching_starts: ``(image ids (B,), generator) -> (B, N)`` FM prompt states (needed only when
            the mixture has ``feature_matching``).
    """

    def __init__(
        self,
        agents: Mapping[str, DQNAgent],
        starts: DefenceStarts,
        seed: int,
        target_sync_every: int,
        feature_matching_starts: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        self.agents, self.starts, self.seed = agents, starts, seed
        self.target_sync_every = target_sync_every
        self.feature_matching_starts = feature_matching_starts
        self.generator = torch.Generator().manual_seed(seed)
        self.env_steps = 0  # batched stepping calls (global: equal on every rank)
        self.transitions = 0  # stored by this rank
        self.episode = 0
        self.phase: str | None = None
        self.episode_ideal: Tensor | None = None
        self.episode_start_dice: Tensor | None = None
        self.pending_env_state: dict[str, Tensor] | None = None
        #: replay buffer per role (:meth:`setup_buffers`) and the RNG of replay samples (:meth:`sample`)
        self.buffers: dict[str, ReplayBuffer] = {}
        self.sample_generator = torch.Generator()
        self._sample_state_loaded = False
        self._pending_buffers: Mapping[str, Any] | None = None

    # -- replay ---------------------------------------------------------------------------------
    def setup_buffers(self, capacity: int, num_nodes: int, sample_seed: int) -> None:
        """Create the role's replay buffers (once) and seed the sampling RNG with ``sample_seed`` (unless a
        checkpoint restored it); buffers restored by :meth:`load_state_dict` before this call are filled in."""
        if self.buffers:
            return
        self.buffers = {r: ReplayBuffer(capacity, num_nodes) for r in ROLES}
        if not self._sample_state_loaded:
            self.sample_generator.manual_seed(sample_seed)
        if self._pending_buffers is not None:
            for role, st in self._pending_buffers.items():
                self.buffers[role].load_state_dict(st)
            self._pending_buffers = None

    def sample(self, role: str, batch_size: int) -> dict[str, Tensor]:
        """A replay sample of a role's buffer (drawn from the Actor's sampling RNG)."""
        return self.buffers[role].sample(batch_size, self.sample_generator)

    # -- episodes -------------------------------------------------------------------------------
    def budgets(self, env: PromptEnv, n: int) -> Tensor:
        """Episode budgets from a generator that depends only on (seed, episode): equal on all ranks."""
        return env.sample_budgets(n, torch.Generator().manual_seed(self.seed * 7919 + self.episode))

    def start_attack(self, env: PromptEnv, ideal: Tensor, envs: int) -> None:
        """Draw ``envs`` images (at most the pool) and start the attack phase from their ideal prompts."""
        n = min(envs, len(env))
        ids = torch.randperm(len(env), generator=self.generator)[:n]
        self.episode_ideal = ideal[ids].clone()
        self.episode_start_dice = env.reset(ids, self.episode_ideal, budget=self.budgets(env, n))
        self.phase = "attack"

    def attacked(self, env: PromptEnv, ids: Tensor, budgets: Tensor, epsilon: float, random: bool) -> Tensor:
        """Final states ``(B, N)`` of the attacker (greedy / epsilon-greedy / random) from the episode's ideal prompts."""
        sel = (env.image_ids[:, None] == ids[None]).any(1)
        agent = self.agents["attack"]
        ideal = self.episode_ideal[sel]
        return agent.final_status(
            agent.inputs(env), ids, ideal, budgets, epsilon, self.generator, random=random
        )

    def defence_start(self, env: PromptEnv) -> tuple[Tensor, Tensor]:
        """Start states ``(B, N)`` and budgets ``(B,)`` of the defence phase for the env's episodes."""
        ids, budgets = env.image_ids.clone(), env.budget.clone()
        kinds = self.starts.draw(len(ids), self.generator)
        start = torch.zeros_like(env.status)
        for k, name in enumerate(self.starts.names):
            rows = (kinds == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if name == "feature_matching":
                if self.feature_matching_starts is None:
                    raise RuntimeError("Actor: feature_matching starts need feature_matching_starts")
                start[rows] = self.feature_matching_starts(ids[rows], self.generator)
            else:
                eps = self.starts.epsilon if name == "epsilon" else 0.0
                start[rows] = self.attacked(env, ids[rows], budgets[rows], eps, random=name == "random")
        if self.starts.budget == "active":
            budgets = (start != 0).sum(1).clamp_min(1)
        return start, budgets

    def start_defence(self, env: PromptEnv) -> None:
        ids = env.image_ids.clone()
        start, budgets = self.defence_start(env)
        self.episode_start_dice = env.reset(ids, start, budget=budgets)
        self.phase = "defend"

    # -- acting ---------------------------------------------------------------------------------
    def step(self, env: PromptEnv, ideal: Tensor, envs: int, epsilon: float) -> ActorStep:
        """One batched epsilon-greedy step of the current phase (starting an episode first if none runs).

        Args:
            env: the training environment.
            ideal: ``(I, N)`` ideal prompts of its image pool.
            envs: episodes per step (images drawn per episode).
            epsilon: exploration rate.
        """
        if self.pending_env_state is not None:  # a resumed run continues its episode
            st = self.pending_env_state
            env.image_ids, env.status, env.steps = st["image_ids"], st["status"], st["steps"]
            env.budget, env.dice = st["budget"], st["dice"]
            self.pending_env_state = None
        if self.phase is None:
            self.start_attack(env, ideal, envs)
        role, episode = self.phase, self.episode
        out = collect_step(env, self.agents[role], role, self.buffers[role], epsilon, self.generator)
        if out.stored:
            self.transitions += out.stored
            self.env_steps += 1
            if self.env_steps % self.target_sync_every == 0:
                for agent in self.agents.values():
                    agent.sync()
        if out.can_act:
            return ActorStep(out.stored, episode=episode)
        if role == "attack":
            drop = self.episode_start_dice - env.dice
            self.start_defence(env)
            return ActorStep(out.stored, "attack", drop, episode)
        self.episode += 1
        self.phase = None
        return ActorStep(out.stored, "defend", env.dice - self.episode_start_dice, episode)

    # -- checkpoints ----------------------------------------------------------------------------
    def env_state(self, env: PromptEnv) -> dict[str, Tensor]:
        """The env's running batch state (what :meth:`step` needs to continue the episode after a resume)."""
        names = ("image_ids", "status", "steps", "budget", "dice")
        return {k: getattr(env, k).clone() for k in names}

    def state_dict(self, env: PromptEnv | None, buffers: bool = False) -> dict[str, Any]:
        """Counters, the running episode (``env``: the training env, needed while an episode runs), the RNG
        states and (``buffers``) the replay buffers: the ``ppd`` section of a checkpoint, minus what the task
        adds."""
        running = self.phase is not None
        out = {
            "env_steps": self.env_steps,
            "episode": self.episode,
            "phase": self.phase or "",
            "episode_ideal": self.episode_ideal if running else None,
            "episode_start_dice": self.episode_start_dice if running else None,
            "env_state": self.env_state(env) if running else None,
            "generator": self.generator.get_state(),
            "sample_generator": self.sample_generator.get_state(),
        }
        if buffers and self.buffers:
            out["buffers"] = {role: buf.state_dict() for role, buf in self.buffers.items()}
        return out

    def load_state_dict(self, st: Mapping[str, Any], transitions: int) -> None:
        self.env_steps = int(st["env_steps"])
        self.transitions = int(transitions)
        self.episode = int(st["episode"])
        self.phase = st["phase"] or None
        self.episode_ideal = st["episode_ideal"]
        self.episode_start_dice = st["episode_start_dice"]
        self.generator.set_state(st["generator"])
        self.pending_env_state = st["env_state"]
        if st.get("sample_generator") is not None:
            self.sample_generator.set_state(st["sample_generator"])
            self._sample_state_loaded = True
        if st.get("buffers") is not None:
            if self.buffers:
                for role, b in st["buffers"].items():
                    self.buffers[role].load_state_dict(b)
            else:
                self._pending_buffers = st["buffers"]
        if self.pending_env_state is None and self.phase is not None:
            # a resumed run without the env state cannot continue the episode: it restarts it
            self.phase = None


def warm_start(
    env: PromptEnv, ideal: Tensor, buffers: Mapping[str, ReplayBuffer], need: int, envs: int, seed: int
) -> None:
    """Fill every role's buffer to ``need`` transitions with random-policy episodes (attack from the ideal
    prompts, then defence from the attacked states), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while min(len(buffers[r]) for r in ROLES) < need:
        n = min(envs, len(env))
        ids = torch.randperm(len(env), generator=g)[:n]
        budgets = env.sample_budgets(n, g)
        for role in ROLES:
            start = ideal[ids] if role == "attack" else env.status.clone()
            env.reset(ids, start, budget=budgets)
            while collect_step(env, None, role, buffers[role], 0.0, g).stored:
                pass
