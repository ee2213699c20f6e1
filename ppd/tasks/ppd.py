"""``PPDTask``: adversarial attacker/defender DQN training (paper Algorithm 1) as a LightningModule.

One ``training_step`` = one batched environment step of the current phase (``envs_per_rank`` transitions
on this rank, stored in that role's replay buffer) followed by one TD update of that role's Q-network on
a replay batch. An episode is:

1. *attack phase*: from the ideal prompts, the attacker acts epsilon-greedily for the episode's step
   budget (budgets ~ U(budget_range), the same on every DDP rank, so all ranks change phase together);
2. the attacker's *greedy* roll-out from the ideal prompts (same budget, no exploration, no learning)
   becomes the defender's start;
3. *defence phase*: the defender acts epsilon-greedily for the budget.

Target networks are synced every ``target_sync_every`` environment steps (global counter of batched steps).
Epsilon decays linearly per episode. Counters, the running episode and the RNG state are checkpointed,
so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from ppd.env.prompt_env import PromptEnv
from ppd.models.qnet import QNetwork, gather_action_q
from ppd.models.qnet_dense import DenseGraphs, DenseQNetwork
from ppd.rl.dense_learner import dense_select_actions, dense_td_loss, greedy_final_status
from ppd.rl.losses import double_dqn_next_value, dqn_next_value, oracle_margin_loss, td_loss, td_target
from ppd.rl.rollout import greedy_defence, q_values, role_mask, rollout, select_actions
from ppd.rl.schedules import LinearSchedule
from ppd.types import ROLES

#: kinds of defence-phase start states (``PPDTask.defence_starts``)
START_KINDS = ("greedy", "epsilon", "random", "feature_matching")


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
        qnet_impl: ``dense`` (default: :class:`~ppd.models.qnet_dense.DenseQNetwork` on per-image static
            tensors, no PyG batches on the training path; equal Q-values and gradients, tested) or ``pyg``
            (the reference :class:`~ppd.models.qnet.QNetwork` on ``PromptEnv.observe`` batches). Both have
            the same parameters, so checkpoints load either way.
        shared_online_forward: dense path only: one online forward over ``s`` and ``s'`` together for the
            Double-DQN target (default False: the ``s'`` forward reuses the first layer's per-image part
            but runs separately without autograd, which measured faster; see the throughput benchmark).
        defence_starts: mixture weights of the defence phase's start states (normalised; drawn per episode
            slot): ``greedy`` (the attacker's greedy result on the ideal prompts, paper Algorithm 1),
            ``epsilon`` (its epsilon-greedy result with ``start_epsilon``), ``random`` (a random attacker's
            result) and ``feature_matching`` (one-shot FM prompts from a random reference of the same
            training data set, ``data.feature_matching`` options: the inference distribution).
            ``None`` = ``{greedy: 1}`` (paper-faithful).
        start_epsilon: exploration rate of the ``epsilon`` start states.
        defend_budget: ``attack`` (paper: the defender gets the attacker's step budget) or ``active`` (the
            number of active start prompts, so it can reach states where only good prompts remain).
        oracle_margin_weight: weight of the GT label-oracle large-margin loss on the defender's Q-values
            (:func:`ppd.rl.losses.oracle_margin_loss`; an extension, 0 = off = paper-faithful).
        oracle_margin: its margin.
        inference_max_steps: defender step budget stored with the agent for inference (``ppd.predict``,
            ``ppd.evaluate``, :class:`~ppd.inference.PromptDefender`); ``None`` = unlimited: the ``Q <= 0``
            rule stops it. Also the budget of the FM part of validation.
        val_feature_matching: validation also refines FM prompts of each validation image (reference: a
            fixed random other image of its data set) and logs ``val/fm_dice``, ``val/fm_defended_dice``
            and ``val/fm_gain`` (the quantity to select checkpoints on, on dev data).
        updates_per_step: optimiser steps per batched environment step (update-to-data ratio =
            ``updates_per_step * batch_size / envs_per_rank`` sampled transitions per stored one). Lightning's
            ``global_step`` (``trainer.max_steps``, ``every_n_train_steps``) counts optimiser steps.
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
        if qnet_impl not in ("dense", "pyg"):
            raise ValueError(f"PPDTask: qnet_impl must be 'dense' or 'pyg', got {qnet_impl!r}")
        self.dense = qnet_impl == "dense"
        starts = dict(defence_starts) if defence_starts else {"greedy": 1.0}
        bad = sorted(set(starts) - set(START_KINDS))
        if bad or any(float(w) < 0 for w in starts.values()) or sum(float(w) for w in starts.values()) <= 0:
            raise ValueError(
                f"PPDTask: defence_starts {starts}: expected non-negative weights of {list(START_KINDS)} "
                f"with a positive sum (unknown: {bad})"
            )
        self.start_names = [k for k in START_KINDS if float(starts.get(k, 0)) > 0]
        self.start_weights = torch.tensor([float(starts[k]) for k in self.start_names])
        if defend_budget not in ("attack", "active"):
            raise ValueError(f"PPDTask: defend_budget must be 'attack' or 'active', got {defend_budget!r}")
        if updates_per_step < 1:
            raise ValueError(f"PPDTask: updates_per_step must be >= 1, got {updates_per_step}")
        if inference_max_steps is not None and inference_max_steps < 0:
            raise ValueError(f"PPDTask: inference_max_steps must be None or >= 0, got {inference_max_steps}")
        qkw = dict(in_dim=feature_dim, hidden=hidden, layers=layers, heads=heads, conv=conv)
        qcls = DenseQNetwork if self.dense else QNetwork
        self.q_att = qcls(out_per_node=2, **qkw)
        self.q_def = qcls(out_per_node=1, **qkw)
        self.q_att_target = copy.deepcopy(self.q_att).requires_grad_(False)
        self.q_def_target = copy.deepcopy(self.q_def).requires_grad_(False)
        self.epsilon_schedule = LinearSchedule(epsilon_start, epsilon_end, epsilon_episodes)
        # counters and the running episode (checkpointed)
        self.env_steps = 0
        self.transitions = 0  # stored by this rank
        self.grad_steps = {"attack": 0, "defend": 0}
        self.episode = 0
        self.phase: str | None = None
        self.episode_ideal: torch.Tensor | None = None
        self.episode_start_dice: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self._pending_env_state: dict[str, Any] | None = None
        self._t_last = time.perf_counter()

    # -- helpers --------------------------------------------------------------------------------
    def qnet(self, role: str, target: bool = False) -> nn.Module:
        """Online or target Q-network of a role."""
        if role == "attack":
            return self.q_att_target if target else self.q_att
        return self.q_def_target if target else self.q_def

    @property
    def epsilon(self) -> float:
        """Exploration rate of the current episode."""
        return float(self.epsilon_schedule.value(self.episode))

    @property
    def env(self) -> PromptEnv:
        return self.trainer.datamodule.env

    def _graphs(self) -> DenseGraphs:
        """The training env's static per-image tensors on this module's device (built once)."""
        cached = getattr(self, "_graphs_cache", None)
        if cached is None or cached[0] is not self.env or cached[1] != self.device:
            cached = (self.env, self.device, self.env.static_graphs().to(self.device))
            self._graphs_cache = cached
        return cached[2]

    def _select(
        self, qnet: nn.Module | None, role: str, epsilon: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Actions ``(B,)`` for the env's current states (dense or PyG path, same random draws)."""
        env = self.env
        if self.dense:
            return dense_select_actions(
                qnet, self._graphs(), env.image_ids, env.status, role, epsilon, generator
            )[0]
        return select_actions(qnet, env.observe(), role, epsilon, generator)[0]

    def _budgets(self, n: int) -> torch.Tensor:
        """Episode budgets from a generator that depends only on (seed, episode): equal on all ranks."""
        g = torch.Generator().manual_seed(self.hparams.seed * 7919 + self.episode)
        return self.env.sample_budgets(n, g)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.q_att.parameters(), lr=self.hparams.lr),
            torch.optim.Adam(self.q_def.parameters(), lr=self.hparams.lr),
        ]

    # -- acting ---------------------------------------------------------------------------------
    def _start_attack(self) -> None:
        dm = self.trainer.datamodule
        n = min(dm.envs_per_rank, len(self.env))
        ids = torch.randperm(len(self.env), generator=self.generator)[:n]
        self.episode_ideal = dm.ideal[ids].clone()
        budgets = self._budgets(n)
        self.episode_start_dice = self.env.reset(ids, self.episode_ideal, budget=budgets)
        self.phase = "attack"

    def _attacked(
        self, ids: torch.Tensor, budgets: torch.Tensor, epsilon: float, random: bool
    ) -> torch.Tensor:
        """Final states of the attacker (greedy / epsilon-greedy / random) from this episode's ideal prompts."""
        env = self.env
        sel = (env.image_ids[:, None] == ids[None]).any(1)
        ideal = self.episode_ideal[sel]
        qnet = None if random else self.q_att
        if self.dense:  # same final states; intermediate states are not decoded (actions need no rewards)
            return greedy_final_status(
                qnet, self._graphs(), ids, ideal, budgets, epsilon=epsilon, generator=self.generator
            )
        return rollout(env, qnet, "attack", ids, ideal, budgets, epsilon, self.generator).status

    def _start_defence(self) -> None:
        env = self.env
        ids, budgets = env.image_ids.clone(), env.budget.clone()
        if self.start_names == ["greedy"]:  # paper-faithful: no draw (keeps older runs' random streams)
            kinds = torch.zeros(len(ids), dtype=torch.long)
        else:
            kinds = torch.multinomial(
                self.start_weights, len(ids), replacement=True, generator=self.generator
            )
        start = torch.zeros_like(env.status)
        for k, name in enumerate(self.start_names):
            rows = (kinds == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if name == "feature_matching":
                start[rows] = self.trainer.datamodule.feature_matching_starts(ids[rows], self.generator)
            else:
                eps = self.hparams.start_epsilon if name == "epsilon" else 0.0
                start[rows] = self._attacked(ids[rows], budgets[rows], eps, random=name == "random")
        if self.hparams.defend_budget == "active":
            budgets = (start != 0).sum(1).clamp_min(1)
        self.episode_start_dice = env.reset(ids, start, budget=budgets)
        self.phase = "defend"

    def _end_phase(self) -> None:
        env = self.env
        if self.phase == "attack":
            drop = (self.episode_start_dice - env.dice).mean()
            self.log("train/attack_dice_drop", drop, on_step=True, sync_dist=True, batch_size=len(env.dice))
            self._start_defence()
        else:
            gain = (env.dice - self.episode_start_dice).mean()
            self.log("train/defense_dice_gain", gain, on_step=True, sync_dist=True, batch_size=len(env.dice))
            self.log("train/episode", float(self.episode), on_step=True)
            self._maybe_log_images()
            self.episode += 1
            self.phase = None
            max_ep = self.hparams.max_episodes
            if max_ep is not None and self.episode >= max_ep:
                self.trainer.should_stop = True

    def act(self) -> int:
        """One batched epsilon-greedy step of the current phase; stores the transitions. Returns their count."""
        if self._pending_env_state is not None:
            self._restore_env_state(self._pending_env_state)
            self._pending_env_state = None
        if self.phase is None:
            self._start_attack()
        env, role = self.env, self.phase
        actions = self._select(self.qnet(role), role, self.epsilon, self.generator)
        live = ~env.done & (actions >= 0)
        stored = 0
        next_mask = None
        if bool(live.any()):
            before = env.status.clone()
            act = actions.clamp_min(0)
            res = env.step_attack(act, live) if role == "attack" else env.step_defend(act, live)
            next_mask = (
                env.attack_mask(env.status).flatten(1) if role == "attack" else env.defend_mask(env.status)
            )
            done = res.done | ~next_mask.any(1)
            idx = live.nonzero().squeeze(1)
            self.trainer.datamodule.buffers[role].add_batch(
                env.image_ids[idx], before[idx], actions[idx], res.reward[idx], env.status[idx], done[idx]
            )
            stored = len(idx)
            self.transitions += stored
            self.env_steps += 1
            if self.env_steps % self.hparams.target_sync_every == 0:
                self.sync_targets()
        # the phase ends when no episode can act any more
        if next_mask is None:
            next_mask = (
                env.attack_mask(env.status).flatten(1) if role == "attack" else env.defend_mask(env.status)
            )
        if not bool((~env.done & next_mask.any(1)).any()):
            self._end_phase()
        return stored

    def sync_targets(self) -> None:
        """Copy online weights into the target networks."""
        self.q_att_target.load_state_dict(self.q_att.state_dict())
        self.q_def_target.load_state_dict(self.q_def.state_dict())

    # -- learning -------------------------------------------------------------------------------
    def td_step(
        self, role: str, sample: dict[str, torch.Tensor], return_q: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """TD loss (eq. 7) of one role on a compact replay sample.

        Args:
            role: ``attack`` or ``defend``.
            sample: compact replay sample.
            return_q: also return the online per-node Q-values of ``s`` (``(S, N * K)``, with gradients).

        Returns:
            ``(loss, mean Q(s, a))``, plus ``q`` with ``return_q``.
        """
        env = self.env
        if self.dense:
            h = self.hparams
            return dense_td_loss(
                self.qnet(role),
                self.qnet(role, target=True),
                self._graphs(),
                sample,
                role,
                h.gamma,
                double_dqn=h.double_dqn,
                huber=h.huber,
                shared_forward=h.shared_online_forward,
                return_q=return_q,
            )
        obs = env.observe(sample["image_id"], sample["status"].long()).to(self.device)
        nxt = env.observe(sample["image_id"], sample["next_status"].long()).to(self.device)
        q = q_values(self.qnet(role), obs)
        q_sa = gather_action_q(q, obs.batch, sample["action"].to(self.device), obs.ptr)
        with torch.no_grad():
            mask_next = role_mask(nxt, role)
            q_tgt_next = q_values(self.qnet(role, target=True), nxt)
            if self.hparams.double_dqn:
                next_v = double_dqn_next_value(
                    q_values(self.qnet(role), nxt), q_tgt_next, mask_next, nxt.batch
                )
            else:
                next_v = dqn_next_value(q_tgt_next, mask_next, nxt.batch)
            target = td_target(
                sample["reward"].to(self.device), sample["done"].to(self.device), next_v, self.hparams.gamma
            )
        out = (td_loss(q_sa, target, huber=self.hparams.huber), q_sa.detach().mean())
        return (*out, q.reshape(len(sample["action"]), -1)) if return_q else out

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> None:
        role = self.phase or "attack"
        t0 = time.perf_counter()
        n = self.act()
        t_act = time.perf_counter() - t0
        dm = self.trainer.datamodule
        for u in range(self.hparams.updates_per_step):
            use_loader = u == 0 and role in batch
            sample = batch[role] if use_loader else dm.buffers[role].sample(dm.batch_size, dm.generator)
            self._update(role, sample)
        short = "att" if role == "attack" else "def"
        now = time.perf_counter()
        self.log("train/epsilon", self.epsilon, on_step=True, prog_bar=True)
        self.log("train/env_steps_per_s", n / max(t_act, 1e-9), on_step=True)
        self.log("train/step_seconds", now - self._t_last, on_step=True)
        self.log(f"train/grad_steps_{short}", float(self.grad_steps[role]), on_step=True)
        self._t_last = now

    def _update(self, role: str, sample: dict[str, torch.Tensor]) -> None:
        """One optimiser step of a role's Q-network on a replay sample (TD loss + optional oracle margin)."""
        opt = self.optimizers()[ROLES.index(role)]
        aux = role == "defend" and self.hparams.oracle_margin_weight > 0
        loss, q_mean, *rest = self.td_step(role, sample, return_q=aux)
        loss_all = loss
        bs = len(sample["reward"])
        if aux:
            status = sample["status"].to(self.device).long()
            node_fg = self.trainer.datamodule.node_fg[sample["image_id"].long()].to(self.device)
            margin = oracle_margin_loss(
                rest[0].reshape(status.shape), status, node_fg, self.hparams.oracle_margin
            )
            loss_all = loss + self.hparams.oracle_margin_weight * margin
            self.log("train/oracle_margin_loss", margin, on_step=True, batch_size=bs)
        if self.trainer.world_size > 1:
            # DDP all-reduces every parameter's gradient: give the idle agent an exact-zero gradient so both
            # networks take part in each backward (plain `ddp` strategy, no find_unused_parameters needed).
            other = self.q_def if role == "attack" else self.q_att
            loss_all = loss_all + 0.0 * sum(p.sum() for p in other.parameters())
        opt.zero_grad()
        self.manual_backward(loss_all)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.grad_steps[role] += 1
        short = "att" if role == "attack" else "def"
        self.log(f"train/td_loss_{short}", loss, on_step=True, prog_bar=True, batch_size=bs)
        self.log(f"train/q_mean_{short}", q_mean, on_step=True, batch_size=bs)

    # -- validation: trained vs random agents with the same number of actions -------------------
    def validation_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        env = dm.val_env
        ideal = dm.val_ideal[ids]
        g = torch.Generator().manual_seed(self.hparams.seed + 17 * batch_idx)
        att = rollout(env, self.q_att, "attack", ids, ideal, self.hparams.val_attack_steps)
        rnd_att = rollout(env, None, "attack", ids, ideal, att.actions_taken, generator=g)
        # the inference rule (ppd.rl.rollout.greedy_defence), so validation measures what users get
        dfn = greedy_defence(
            env, self.q_def, ids, att.status, self.hparams.val_defend_steps, self.hparams.keep_last_positive
        )
        defended = env.dice_of(ids, dfn.status)
        rnd_def = rollout(env, None, "defend", ids, att.status, dfn.steps, generator=g)
        b = len(ids)
        for name, value in {
            "val/ideal_dice": att.start_dice,
            "val/attacked_dice": att.dice,
            "val/attack_drop": att.start_dice - att.dice,
            "val/random_attack_drop": rnd_att.start_dice - rnd_att.dice,
            "val/defended_dice": defended,
            "val/defense_gain": defended - att.dice,
            "val/random_defense_gain": rnd_def.dice - rnd_def.start_dice,
            "val/defender_actions": dfn.steps.float(),
        }.items():
            self.log(name, value.float().mean(), on_epoch=True, sync_dist=True, batch_size=b)
        if self.hparams.val_feature_matching:
            gf = torch.Generator().manual_seed(self.hparams.seed + 31 * batch_idx)
            fm = dm.feature_matching_starts(ids, gf, split="val")
            fm_dfn = greedy_defence(
                env, self.q_def, ids, fm, self.hparams.inference_max_steps, self.hparams.keep_last_positive
            )
            fm_dice, fm_def = env.dice_of(ids, fm), env.dice_of(ids, fm_dfn.status)
            for name, value in {
                "val/fm_dice": fm_dice,
                "val/fm_defended_dice": fm_def,
                "val/fm_gain": fm_def - fm_dice,
                "val/fm_defender_actions": fm_dfn.steps.float(),
            }.items():
                self.log(name, value.float().mean(), on_epoch=True, sync_dist=True, batch_size=b)

    # -- images ---------------------------------------------------------------------------------
    def _maybe_log_images(self) -> None:
        """Every ``image_log_every`` episodes (rank 0): episode panel to W&B and ``<run>/panels/*.png``.

        The PNG copy is what ``python -m ppd.report`` shows to users without W&B.
        """
        every = self.hparams.image_log_every
        if not every or self.episode % every or self.global_rank != 0:
            return
        from lightning.pytorch.loggers import WandbLogger
        from PIL import Image

        from ppd.io import atomic_write_bytes
        from ppd.viz import episode_panel, png_bytes

        env = self.env
        i = int(env.image_ids[0])
        panel = episode_panel(env, i, self.episode_ideal[0], self.trainer.datamodule)
        caption = f"episode {self.episode}, step {self.global_step}"
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="train/episode_panel", images=[panel], caption=[caption])
        out = os.path.join(str(self.trainer.default_root_dir), "panels", f"episode_{self.episode:05d}.png")
        atomic_write_bytes(out, png_bytes(Image.fromarray(panel)))

    # -- checkpointing --------------------------------------------------------------------------
    def _env_state(self) -> dict[str, Any]:
        env = self.env
        return {
            "image_ids": env.image_ids.clone(),
            "status": env.status.clone(),
            "steps": env.steps.clone(),
            "budget": env.budget.clone(),
            "dice": env.dice.clone(),
        }

    def _restore_env_state(self, st: dict[str, Any]) -> None:
        env = self.env
        env.image_ids, env.status, env.steps = st["image_ids"], st["status"], st["steps"]
        env.budget, env.dice = st["budget"], st["dice"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        running = self.phase is not None
        # every rank reaches this hook (only rank 0 writes the file): record what each actor contributed
        per_rank = self.all_gather(torch.tensor(self.transitions)).reshape(-1).tolist()
        checkpoint["ppd"] = {
            "transitions_per_rank": [int(t) for t in per_rank],
            "env_steps": self.env_steps,
            "grad_steps": dict(self.grad_steps),
            "episode": self.episode,
            "phase": self.phase or "",
            "episode_ideal": self.episode_ideal if running else None,
            "episode_start_dice": self.episode_start_dice if running else None,
            "env_state": self._env_state() if running else None,
            "generator": self.generator.get_state(),
        }
        dm = getattr(self.trainer, "datamodule", None)
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
        self.env_steps = int(st["env_steps"])
        self.transitions = int(
            st["transitions_per_rank"][min(self.global_rank, len(st["transitions_per_rank"]) - 1)]
        )
        self.grad_steps = dict(st["grad_steps"])
        self.episode = int(st["episode"])
        self.phase = st["phase"] or None
        self.episode_ideal = st["episode_ideal"]
        self.episode_start_dice = st["episode_start_dice"]
        self.generator.set_state(st["generator"])
        self._pending_env_state = st["env_state"]

    # -- warm start -----------------------------------------------------------------------------
    def on_train_end(self) -> None:
        """Write ``last.ckpt`` with the final state.

        Lightning's ``ModelCheckpoint(save_last=True)`` only writes ``last.ckpt`` at the end of training if it
        never wrote one before, so a run that stops on ``max_episodes`` (mid-epoch, between two
        ``every_n_train_steps`` saves) would otherwise keep an older ``last.ckpt``. Rewriting it once at the
        end is cheap and always right.
        """
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "save_last", False) and getattr(cb, "dirpath", None):
                self.trainer.save_checkpoint(
                    os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
                )

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm.decoder_backend == "torch" and dm.sam is not None:
            dm.sam.to(self.device)  # SAM's prompt encoder + mask decoder run where the Q-networks run
        need = min(dm.batch_size, dm.buffer_capacity)
        env = self.env
        g = torch.Generator().manual_seed(self.hparams.seed + 1000 * (self.global_rank + 1))
        while len(dm.buffers["attack"]) < max(need, dm.warm_start_steps) or len(dm.buffers["defend"]) < max(
            need, dm.warm_start_steps
        ):
            n = min(dm.envs_per_rank, len(env))
            ids = torch.randperm(len(env), generator=g)[:n]
            budgets = env.sample_budgets(n, g)
            for role in ROLES:
                start = dm.ideal[ids] if role == "attack" else env.status.clone()
                env.reset(ids, start, budget=budgets)
                while True:
                    actions = self._select(None, role, 0.0, g)
                    live = ~env.done & (actions >= 0)
                    if not bool(live.any()):
                        break
                    before = env.status.clone()
                    act = actions.clamp_min(0)
                    res = env.step_attack(act, live) if role == "attack" else env.step_defend(act, live)
                    m = (
                        env.attack_mask(env.status).flatten(1)
                        if role == "attack"
                        else env.defend_mask(env.status)
                    )
                    done = res.done | ~m.any(1)
                    idx = live.nonzero().squeeze(1)
                    dm.buffers[role].add_batch(
                        env.image_ids[idx],
                        before[idx],
                        actions[idx],
                        res.reward[idx],
                        env.status[idx],
                        done[idx],
                    )
        if self._pending_env_state is None and self.phase is not None:
            # a resumed run without the env state cannot continue the episode: restart it
            self.phase = None


def env_config(dm: Any) -> dict[str, Any]:
    """Plain-type description of the graph/feature set-up a trained agent expects (stored in checkpoints)."""
    c = dm.cache_cfg
    return {
        "grid": dm.grid,
        "k_feature": dm.k_feature,
        "k_physical": dm.k_physical,
        "ideal_interval": dm.ideal_interval,
        "ideal_max_pos": dm.ideal_max_pos,
        "ideal_max_neg": dm.ideal_max_neg,
        "sam_variant": c.sam_variant,
        "dino_name": c.dino_name,
        "dino_resolution": c.dino_resolution,
        "feature_dim": dm.feature_dim,
        "feature_matching": dict(dm.fm_options),
    }
