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
from ppd.rl.losses import double_dqn_next_value, dqn_next_value, td_loss, td_target
from ppd.rl.rollout import greedy_defence, q_values, role_mask, rollout, select_actions
from ppd.rl.schedules import LinearSchedule
from ppd.types import ROLES


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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if qnet_impl not in ("dense", "pyg"):
            raise ValueError(f"PPDTask: qnet_impl must be 'dense' or 'pyg', got {qnet_impl!r}")
        self.dense = qnet_impl == "dense"
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

    def _start_defence(self) -> None:
        env = self.env
        ids, budgets = env.image_ids.clone(), env.budget.clone()
        if self.dense:  # same final states; intermediate states are not decoded (greedy needs no rewards)
            attacked = greedy_final_status(self.q_att, self._graphs(), ids, self.episode_ideal, budgets)
        else:
            attacked = rollout(env, self.q_att, "attack", ids, self.episode_ideal, budgets).status
        self.episode_start_dice = env.reset(ids, attacked, budget=budgets)
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
    def td_step(self, role: str, sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """TD loss (eq. 7) of one role on a compact replay sample.

        Returns:
            ``(loss, mean Q(s, a))``.
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
        return td_loss(q_sa, target, huber=self.hparams.huber), q_sa.detach().mean()

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> None:
        role = self.phase or "attack"
        t0 = time.perf_counter()
        n = self.act()
        t_act = time.perf_counter() - t0
        opt = self.optimizers()[ROLES.index(role)]
        dm = self.trainer.datamodule
        sample = batch[role] if role in batch else dm.buffers[role].sample(dm.batch_size, dm.generator)
        loss, q_mean = self.td_step(role, sample)
        loss_all = loss
        if self.trainer.world_size > 1:
            # DDP all-reduces every parameter's gradient: give the idle agent an exact-zero gradient so both
            # networks take part in each backward (plain `ddp` strategy, no find_unused_parameters needed).
            other = self.q_def if role == "attack" else self.q_att
            loss_all = loss + 0.0 * sum(p.sum() for p in other.parameters())
        opt.zero_grad()
        self.manual_backward(loss_all)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.grad_steps[role] += 1
        short = "att" if role == "attack" else "def"
        bs = len(sample["reward"])
        self.log(f"train/td_loss_{short}", loss, on_step=True, prog_bar=True, batch_size=bs)
        self.log(f"train/q_mean_{short}", q_mean, on_step=True, batch_size=bs)
        self.log("train/epsilon", self.epsilon, on_step=True, prog_bar=True)
        now = time.perf_counter()
        self.log("train/env_steps_per_s", n / max(t_act, 1e-9), on_step=True)
        self.log("train/step_seconds", now - self._t_last, on_step=True)
        self._t_last = now

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
            checkpoint["ppd"]["env_config"] = env_config(dm)

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
    }
