"""``PPDTask``: adversarial attacker/defender DQN training (paper Algorithm 1) as a LightningModule.

The task wires the pieces and optimises: a :class:`ppd.rl.agent.DQNAgent` per role (Q-networks, acting, TD
loss) and the :class:`ppd.rl.actor.Actor` (episodes, phases, budgets, defence starts). One ``training_step``
= one :meth:`~ppd.rl.actor.Actor.step` + ``updates_per_step`` TD updates of that role's agent. Counters, the
running episode and the RNG state are checkpointed (a resumed run continues exactly); the checkpoint layout
(``q_att``, ``q_def``, ``q_att_target``, ``q_def_target``, ``ppd``) is unchanged, so old checkpoints load.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import nn

from ppd.callbacks import save_last_checkpoint
from ppd.data.replay import env_config
from ppd.env.prompt_env import PromptEnv
from ppd.env.roles import get_role
from ppd.rl.actor import Actor, DefenceStarts, warm_start
from ppd.rl.agent import DQNAgent, build_agent
from ppd.rl.losses import AuxLoss
from ppd.rl.schedules import LinearSchedule
from ppd.rl.validation import adversarial_metrics, feature_matching_metrics
from ppd.types import ROLES

__all__ = ["PPDTask", "env_config"]


class PPDTask(L.LightningModule):
    """Attacker + defender DQNs over the dual-space prompt graph.

    Args:
        feature_dim: node input width (linked from the DataModule: DINOv2 channels + 5).
        hidden: GNN width.
        layers: message-passing layers.
        heads: attention heads per conv.
        conv: ``transformer`` (TransformerConv) or ``gatv2`` (GATv2Conv).
        lr: Adam learning rate of both agents (paper 1e-4).
        gamma: discount factor.
        double_dqn: Double-DQN targets.
        huber: Huber (smooth L1) TD loss instead of MSE.
        target_sync_every: environment steps between target-network syncs (paper 100).
        epsilon_start: initial exploration rate (paper 1.0).
        epsilon_end: final exploration rate (paper 0.1).
        epsilon_episodes: episodes over which epsilon decays linearly.
        max_episodes: stop training after this many episodes (paper 1000); ``None`` = trainer limits only.
        grad_clip: max gradient norm per update (``None`` = off).
        val_attack_steps: attacker actions per validation image.
        val_defend_steps: defender action budget per validation image (stops early once its best Q <= 0).
        keep_last_positive: validation's defender never removes the last positive prompt (the inference
            rule of :func:`ppd.rl.rollout.greedy_defence`).
        image_log_every: log an image panel every N episodes (0 = never).
        seed: RNG seed (episode images, exploration, budgets).
        qnet_impl: the agents (:func:`ppd.rl.agent.build_agent`): ``dense`` (default, the training hot path)
            or ``pyg`` (the PyG reference); same parameters, so checkpoints load either way.
        shared_online_forward: dense path only: one online forward over ``s`` and ``s'`` together for the
            Double-DQN target (default False: measured slower, see the throughput benchmark).
        defence_starts: mixture weights of the defence phase's start kinds ``greedy`` (paper), ``epsilon``,
            ``random``, ``feature_matching`` (:class:`ppd.rl.actor.DefenceStarts`); ``None`` = ``{greedy: 1}``.
        start_epsilon: exploration rate of the ``epsilon`` start states.
        defend_budget: ``attack`` (paper: the attacker's step budget) or ``active`` (active start prompts).
        oracle_margin_weight: weight of the GT label-oracle large-margin loss on the defender's Q-values
            (:func:`ppd.rl.losses.oracle_margin_loss`; an extension, 0 = off = paper-faithful); with
            ``oracle_margin`` (its margin) the typed option group :class:`ppd.rl.losses.AuxLoss`.
        oracle_margin: its margin.
        inference_max_steps: defender step budget stored with the agent for inference (``None`` = until its
            best Q <= 0); also the budget of the FM part of validation.
        val_feature_matching: validation also refines FM prompts of each validation image and logs
            ``val/fm_dice``, ``val/fm_defended_dice``, ``val/fm_gain`` (select checkpoints on it, on dev data).
        updates_per_step: optimiser steps per batched environment step (Lightning's ``global_step``,
            hence ``trainer.max_steps`` and ``every_n_train_steps``, counts optimiser steps).
    """

    def __init__(
        self,
        feature_dim: int = 389,
        hidden: int = 128,
        layers: int = 3,
        heads: int = 2,
        conv: str = "transformer",
        lr: float = 1e-4,
        gamma: float = 0.95,
        double_dqn: bool = True,
        huber: bool = True,
        target_sync_every: int = 100,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.1,
        epsilon_episodes: int = 1000,
        max_episodes: int | None = 1000,
        grad_clip: float | None = 10.0,
        val_attack_steps: int = 10,
        val_defend_steps: int = 10,
        keep_last_positive: bool = True,
        image_log_every: int = 50,
        seed: int = 0,
        qnet_impl: str = "dense",
        shared_online_forward: bool = False,
        defence_starts: dict[str, float] | None = None,
        start_epsilon: float = 0.3,
        defend_budget: str = "attack",
        oracle_margin_weight: float = 0.0,
        oracle_margin: float = 0.05,
        inference_max_steps: int | None = None,
        val_feature_matching: bool = False,
        updates_per_step: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        try:
            starts = DefenceStarts(defence_starts or {"greedy": 1.0}, start_epsilon, defend_budget)
            self.aux_loss = AuxLoss(oracle_margin_weight, oracle_margin)
        except ValueError as err:
            raise ValueError(f"PPDTask: {err}") from None
        if updates_per_step < 1:
            raise ValueError(f"PPDTask: updates_per_step must be >= 1, got {updates_per_step}")
        if inference_max_steps is not None and inference_max_steps < 0:
            raise ValueError(f"PPDTask: inference_max_steps must be None or >= 0, got {inference_max_steps}")
        kw = dict(in_dim=feature_dim, hidden=hidden, layers=layers, heads=heads, conv=conv, gamma=gamma)
        kw.update(double_dqn=double_dqn, huber=huber, shared_forward=shared_online_forward)
        #: one agent per role (a plain dict: the networks are registered below under the checkpoint names)
        self.agents: dict[str, DQNAgent] = {r: build_agent(r, qnet_impl, **kw) for r in ROLES}
        # checkpoint layout (old checkpoints, ppd.export): q_att, q_def, q_att_target, q_def_target
        self.q_att, self.q_def = self.agents["attack"].online, self.agents["defend"].online
        self.q_att_target, self.q_def_target = self.agents["attack"].target, self.agents["defend"].target
        self.epsilon_schedule = LinearSchedule(epsilon_start, epsilon_end, epsilon_episodes)
        fm_starts = lambda ids, g: self.trainer.datamodule.feature_matching_starts(ids, g)  # noqa: E731
        self.actor = Actor(self.agents, starts, seed, target_sync_every, fm_starts)
        self.grad_steps = {"attack": 0, "defend": 0}
        self._t_last = time.perf_counter()

    # the actor's state, under the names earlier versions (and their tests / callbacks) read
    env_steps = property(lambda self: self.actor.env_steps)
    transitions = property(lambda self: self.actor.transitions)
    episode = property(lambda self: self.actor.episode)
    phase = property(lambda self: self.actor.phase)

    def qnet(self, role: str, target: bool = False) -> nn.Module:
        """Online or target Q-network of a role."""
        agent = self.agents[get_role(role).name]
        return agent.target if target else agent.online

    @property
    def epsilon(self) -> float:
        """Exploration rate of the current episode."""
        return float(self.epsilon_schedule.value(self.episode))

    @property
    def env(self) -> PromptEnv:
        return self.trainer.datamodule.env

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.q_att.parameters(), lr=self.hparams.lr),
            torch.optim.Adam(self.q_def.parameters(), lr=self.hparams.lr),
        ]

    # -- acting ---------------------------------------------------------------------------------
    def act(self) -> int:
        """One batched epsilon-greedy step of the current phase; stores the transitions. Returns their count."""
        dm = self.trainer.datamodule
        out = self.actor.step(self.env, dm.ideal, dm.envs_per_rank, self.epsilon)
        b = len(self.env.dice)
        if out.ended == "attack":
            self.log("train/attack_dice_drop", out.change.mean(), on_step=True, sync_dist=True, batch_size=b)
        elif out.ended == "defend":
            self.log("train/defense_dice_gain", out.change.mean(), on_step=True, sync_dist=True, batch_size=b)
            self.log("train/episode", float(out.episode), on_step=True)
            every = self.hparams.image_log_every  # episode panel (ppd.viz), rank 0
            if every and out.episode % every == 0 and self.global_rank == 0:
                from ppd.viz import write_episode_panel

                tr, ideal = self.trainer, self.actor.episode_ideal[0]
                write_episode_panel(
                    tr.loggers, tr.default_root_dir, self.env, ideal, dm, out.episode, self.global_step
                )
            if self.hparams.max_episodes is not None and self.episode >= self.hparams.max_episodes:
                self.trainer.should_stop = True
        return out.stored

    # -- learning -------------------------------------------------------------------------------
    def td_step(
        self, role: str, sample: dict[str, torch.Tensor], return_q: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """TD loss of a role's agent on a replay sample (:meth:`ppd.rl.agent.DQNAgent.td_loss`)."""
        agent = self.agents[role]
        return agent.td_loss(agent.inputs(self.env), sample, return_q=return_q)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> None:
        role = self.phase or "attack"
        t0 = time.perf_counter()
        n = self.act()
        t_act = time.perf_counter() - t0
        dm = self.trainer.datamodule
        for u in range(self.hparams.updates_per_step):
            if u == 0 and dm.sample_roles == "both":  # the original behaviour: both buffers sampled per step
                sample = {r: self.actor.sample(r, dm.batch_size) for r in ROLES}[role]
            else:
                sample = self.actor.sample(role, dm.batch_size)
            self._update(role, sample)
        short = get_role(role).short
        now = time.perf_counter()
        self.log("train/epsilon", self.epsilon, on_step=True, prog_bar=True)
        self.log("train/env_steps_per_s", n / max(t_act, 1e-9), on_step=True)
        self.log("train/step_seconds", now - self._t_last, on_step=True)
        self.log(f"train/grad_steps_{short}", float(self.grad_steps[role]), on_step=True)
        self._t_last = now

    def _update(self, role: str, sample: dict[str, torch.Tensor]) -> None:
        """One optimiser step of a role's Q-network on a replay sample (TD loss + optional oracle margin)."""
        opt = self.optimizers()[ROLES.index(role)]
        aux = self.aux_loss.applies_to(role)
        loss, q_mean, *rest = self.td_step(role, sample, return_q=aux)
        loss_all = loss
        bs = len(sample["reward"])
        if aux:
            status = sample["status"].to(self.device).long()
            node_fg = self.trainer.datamodule.node_fg[sample["image_id"].long()].to(self.device)
            weighted, margin = self.aux_loss.weighted(rest[0].reshape(status.shape), status, node_fg)
            loss_all = loss + weighted
            self.log("train/oracle_margin_loss", margin, on_step=True, batch_size=bs)
        if self.trainer.world_size > 1:
            # DDP all-reduces every parameter's gradient: give the idle agent an exact-zero gradient so both
            # networks take part in each backward (plain `ddp` strategy, no find_unused_parameters needed).
            others = [a.online for r, a in self.agents.items() if r != role]
            loss_all = loss_all + 0.0 * sum(p.sum() for net in others for p in net.parameters())
        opt.zero_grad()
        self.manual_backward(loss_all)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.grad_steps[role] += 1
        short = get_role(role).short
        self.log(f"train/td_loss_{short}", loss, on_step=True, prog_bar=True, batch_size=bs)
        self.log(f"train/q_mean_{short}", q_mean, on_step=True, batch_size=bs)

    # -- validation: trained vs random agents with the same number of actions -------------------
    def validation_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        dm, h = self.trainer.datamodule, self.hparams
        g = torch.Generator().manual_seed(h.seed + 17 * batch_idx)
        metrics = adversarial_metrics(
            dm.val_env, self.agents["attack"], self.agents["defend"], ids, dm.val_ideal[ids], h.val_attack_steps, h.val_defend_steps,
            h.keep_last_positive, g,
        )  # fmt: skip
        if h.val_feature_matching:
            fm = dm.feature_matching_starts(
                ids, torch.Generator().manual_seed(h.seed + 31 * batch_idx), "val"
            )
            metrics |= feature_matching_metrics(
                dm.val_env, self.agents["defend"], ids, fm, h.inference_max_steps, h.keep_last_positive
            )
        for name, value in metrics.items():
            self.log(name, value.float().mean(), on_epoch=True, sync_dist=True, batch_size=len(ids))

    # -- checkpointing --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank reaches this hook (only rank 0 writes the file): record what each actor contributed
        per_rank = self.all_gather(torch.tensor(self.transitions)).reshape(-1).tolist()
        checkpoint["ppd"] = {
            "transitions_per_rank": [int(t) for t in per_rank],
            "grad_steps": dict(self.grad_steps),
        }
        dm = getattr(self.trainer, "datamodule", None)
        env, buffers = self.env if self.phase is not None else None, bool(getattr(dm, "save_buffers", False))
        checkpoint["ppd"].update(self.actor.state_dict(env, buffers))
        if dm is not None:
            checkpoint["ppd"]["env_config"] = {
                **env_config(dm),
                # inference settings travel with the agent (ppd.export -> PromptDefender / predict / evaluate)
                "max_steps": self.hparams.inference_max_steps,
                "keep_last_positive": bool(self.hparams.keep_last_positive),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("ppd")
        if not st:
            return
        # older checkpoints: replay RNG + buffers in the data module's section (under its class name)
        old = next((v for k, v in checkpoint.items() if k.endswith("DataModule") and isinstance(v, dict)), {})
        st = {"sample_generator": old.get("generator"), "buffers": old.get("buffers"), **st}
        per_rank = st["transitions_per_rank"]
        self.actor.load_state_dict(st, transitions=per_rank[min(self.global_rank, len(per_rank) - 1)])
        self.grad_steps = dict(st["grad_steps"])

    def on_train_end(self) -> None:
        save_last_checkpoint(self.trainer)  # the final state, also when max_episodes stops mid-epoch

    # -- warm start -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm.decoder_backend == "torch" and dm.sam is not None:
            dm.sam.to(self.device)  # SAM's prompt encoder + mask decoder run where the Q-networks run
        need = max(min(dm.batch_size, dm.buffer_capacity), dm.warm_start_steps)
        seed = self.hparams.seed + 1000 * (self.global_rank + 1)
        self.actor.setup_buffers(dm.buffer_capacity, dm.num_nodes, dm.seed + self.global_rank)
        warm_start(self.env, dm.ideal, self.actor.buffers, need, dm.envs_per_rank, seed)
