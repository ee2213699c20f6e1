"""``CounterfactualDefenderTask``: the PPD defender fitted to SAM's exact removal rewards (issue 23).

Every stored state carries the exact one-step reward of every valid removal
(:mod:`ppd.rl.counterfactual`), so the defender's Q-network is fitted to all of them at once (γ = 0: Q(s,
remove i) = ΔDice), with a per-state listwise ranking loss beside the regression (only the order of the
removals and the sign at the stop matter to the greedy ``Q <= 0`` defence loop). The network and the
checkpoint layout are those of :class:`ppd.tasks.ppd.PPDTask`'s defender (``q_def``, ``ppd.env_config``),
so ``ppd.export``, :class:`ppd.inference.PromptDefender`, ``ppd.predict`` and ``ppd.evaluate`` use it
unchanged; with ``data.sam_inputs`` the node inputs include SAM's current prediction, re-decoded after each
removal at inference as in training.

The defender is a :class:`ppd.rl.agent.DQNAgent` (``qnet_impl: dense``, the default): training, the table
metrics and the FM validation all compute Q with the dense forward (``DenseQNetwork.forward_dense`` on
``env.static_graphs()``, the SAM inputs as ``extra``), the path ``ppd.export`` / ``PromptDefender`` run at
inference. ``qnet_impl: pyg`` trains the same network through the PyG reference behind the same interface.

Validation (dev images only): the defender refines the FM prompts of the dev images exactly as at
inference (:func:`ppd.rl.rollout.greedy_defence`) -> ``val/fm_dice``, ``val/fm_defended_dice``,
``val/fm_gain`` (the checkpoint criterion), ``val/fm_removed``; on the held-out training images' tables:
``val/table_mse``, ``val/table_top1`` (the argmax is the best removal), ``val/table_regret`` (best ΔDice
minus the argmax's) and ``val/table_stop_acc`` (sign of max Q = sign of the best ΔDice).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from ppd.env.roles import DEFEND
from ppd.rl.agent import DQNAgent, build_agent
from ppd.rl.losses import counterfactual_regression_loss, listwise_ranking_loss, oracle_margin_loss
from ppd.rl.rollout import greedy_defence
from ppd.tasks.ppd import env_config


class CounterfactualDefenderTask(L.LightningModule):
    """Fit the defender's Q to the exact ΔDice of every removal (regression + per-state ranking).

    Args:
        feature_dim: node input width (linked from the data module by ``ppd.fit``).
        hidden: Q-network width.
        layers: message-passing layers.
        heads: attention heads.
        conv: ``transformer`` (paper) or another :class:`QNetwork` conv.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        regression_weight: weight of :func:`counterfactual_regression_loss`.
        ranking_weight: weight of :func:`listwise_ranking_loss`.
        ranking_temperature: its temperature (ΔDice units).
        label_margin_weight: weight of the GT label-oracle margin loss (:func:`oracle_margin_loss`, an
            ablation of issue 23; 0 = off).
        label_margin: its margin in ΔDice units.
        reward_scale: Q predicts ``reward_scale * ΔDice`` (better-conditioned targets; the sign, hence the
            ``Q <= 0`` stop rule, and the order of the removals are unchanged).
        inference_max_steps: step rule stored with the defender (``None`` = the ``Q <= 0`` stop).
        keep_last_positive: never remove the last positive prompt (stored with the defender).
        seed: seed of the validation FM references.
        qnet_impl: ``dense`` (default: the one Q path of training and inference) or ``pyg`` (the PyG
            reference, same parameters; :func:`ppd.rl.agent.build_agent`).
    """

    def __init__(
        self,
        feature_dim: int,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        conv: str = "transformer",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        regression_weight: float = 1.0,
        ranking_weight: float = 1.0,
        ranking_temperature: float = 0.02,
        label_margin_weight: float = 0.0,
        label_margin: float = 0.05,
        reward_scale: float = 10.0,
        inference_max_steps: int | None = None,
        keep_last_positive: bool = True,
        seed: int = 0,
        qnet_impl: str = "dense",
    ) -> None:
        super().__init__()
        if regression_weight < 0 or ranking_weight < 0 or regression_weight + ranking_weight <= 0:
            raise ValueError(
                f"model.regression_weight and ranking_weight must be >= 0, not both 0; got "
                f"{regression_weight}, {ranking_weight}"
            )
        if reward_scale <= 0:
            raise ValueError(f"model.reward_scale must be > 0, got {reward_scale}")
        self.save_hyperparameters()
        # gamma = 0 fit: no target network (the agent's target is its online network)
        agent = build_agent(
            DEFEND,
            qnet_impl,
            in_dim=feature_dim,
            hidden=hidden,
            layers=layers,
            heads=heads,
            conv=conv,
            target=False,
        )
        #: the defender agent (a plain dict, as in PPDTask: its network is registered as ``q_def``, the
        #: checkpoint layout ``ppd.export`` reads)
        self.agents: dict[str, DQNAgent] = {"defend": agent}
        self.q_def = agent.online
        self._val: dict[str, list[torch.Tensor]] = {}
        self._fit_t0: float | None = None
        self._fit_seconds = 0.0

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def dm(self) -> Any:
        return self.trainer.datamodule

    @property
    def agent(self) -> DQNAgent:
        return self.agents["defend"]

    def _q(self, env: Any, ids: torch.Tensor, status: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` Q-values of B states with gradients (SAM inputs appended when the data module uses
        them): the agent's forward (dense unless ``qnet_impl: pyg``)."""
        agent = self.agent
        extra = sam.float() if self.dm.sam_inputs else None
        return agent(agent.inputs(env), ids, status.long(), extra)

    def losses(
        self,
        q: torch.Tensor,
        rewards: torch.Tensor,
        status: torch.Tensor,
        node_fg: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted regression + ranking (+ label-margin) losses of a batch (``loss`` = their sum).

        Args:
            q: ``(B, N)`` Q-values; rewards: ``(B, N)`` exact ΔDice (NaN = no action); status: ``(B, N)``;
            node_fg: ``(B, N)`` bool GT at the nodes (only for the label-margin ablation).
        """
        hp = self.hparams
        r = rewards.to(q.device) * hp.reward_scale
        out = {
            "mse": counterfactual_regression_loss(q, r),
            "rank": listwise_ranking_loss(q, r, hp.ranking_temperature * hp.reward_scale),
        }
        out["loss"] = hp.regression_weight * out["mse"] + hp.ranking_weight * out["rank"]
        if hp.label_margin_weight > 0 and node_fg is not None:
            out["margin"] = oracle_margin_loss(
                q, status.to(q.device), node_fg.to(q.device), hp.label_margin * hp.reward_scale
            )
            out["loss"] = out["loss"] + hp.label_margin_weight * out["margin"]
        return out

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, status, rewards, sam = batch
        fg = self.dm.node_fg[ids] if self.hparams.label_margin_weight > 0 else None
        out = self.losses(self._q(self.dm.env, ids, status, sam), rewards, status, fg)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=False, batch_size=len(ids))
        self.log("train/labelled_actions", float(self.dm.labelled_actions), batch_size=len(ids))
        return out["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.q_def.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    # -- validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def _acc(self, name: str, value: torch.Tensor) -> None:
        self._val.setdefault(name, []).append(value.detach().float().cpu().reshape(-1))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, torch.Tensor):  # dev image ids: refine their FM prompts as at inference
            self._fm_step(batch)
        else:  # held-out table states: how well Q ranks the removals
            self._table_step(*batch)

    def _fm_step(self, ids: torch.Tensor) -> None:
        dm = self.dm
        env = dm.val_env
        # one fixed reference per dev image, the same at every validation (seeded by the first id)
        g = torch.Generator().manual_seed(self.hparams.seed * 7919 + int(ids[0]))
        start = dm.feature_matching_starts(ids, g, "val")
        tr = greedy_defence(
            env,
            self.agent,
            ids,
            start,
            self.hparams.inference_max_steps,
            self.hparams.keep_last_positive,
            dm.sam_inputs,
        )
        before = env.dice_of(ids, start)
        after = env.dice_of(ids, tr.status)
        self._acc("fm_dice", before)
        self._acc("fm_defended_dice", after)
        self._acc("fm_gain", after - before)
        self._acc("fm_removed", tr.steps.float())

    def _table_step(
        self, ids: torch.Tensor, status: torch.Tensor, rewards: torch.Tensor, sam: torch.Tensor
    ) -> None:
        q = self._q(self.dm.env, ids, status, sam)
        valid = ~torch.isnan(rewards)
        self._acc("table_mse", ((q.cpu() / self.hparams.reward_scale - rewards)[valid]) ** 2)
        neg = torch.tensor(float("-inf"))
        best_r = torch.where(valid, rewards, neg).max(1).values
        pick = torch.where(valid, q.cpu(), neg).argmax(1)
        r_pick = rewards.gather(1, pick[:, None])[:, 0]
        self._acc("table_top1", (r_pick >= best_r - 1e-6).float())
        self._acc("table_regret", best_r - r_pick)
        self._acc(
            "table_stop_acc", ((torch.where(valid, q.cpu(), neg).max(1).values > 0) == (best_r > 0)).float()
        )

    def on_fit_start(self) -> None:
        self._fit_t0 = time.perf_counter() - self._fit_seconds  # a resumed run continues its clock

    def on_validation_epoch_end(self) -> None:
        for name, vals in self._val.items():
            self.log(f"val/{name}", torch.cat(vals).mean(), prog_bar=name == "fm_gain")
        if self._fit_t0 is not None:  # inside fit: the dev curve against training wall time (tables excluded)
            self._fit_seconds = time.perf_counter() - self._fit_t0
            self.log("val/fit_seconds", float(self._fit_seconds))

    # -- checkpoints --------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._fit_seconds = float(checkpoint.get("ppd", {}).get("fit_seconds", 0.0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The layout ``ppd.export`` reads from a PPD checkpoint, plus what the counterfactual fit used."""
        dm = getattr(self.trainer, "datamodule", None)
        checkpoint["ppd"] = {
            "episode": int(self.current_epoch),
            "env_steps": int(getattr(dm, "decodes", 0)),
            "trainer": "counterfactual",
            "labelled_actions": int(getattr(dm, "labelled_actions", 0)),
            "fit_seconds": float(self._fit_seconds),
        }
        if dm is not None:
            checkpoint["ppd"]["env_config"] = {
                **env_config(dm),
                "feature_dim": int(dm.feature_dim),
                "sam_inputs": bool(dm.sam_inputs),
                "max_steps": self.hparams.inference_max_steps,
                "keep_last_positive": bool(self.hparams.keep_last_positive),
            }
