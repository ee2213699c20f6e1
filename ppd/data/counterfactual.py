"""``CounterfactualDataModule``: the (state, exact rewards) tables of the counterfactual defender (issue 23).

It is a :class:`ppd.data.replay.ReplayDataModule` (same data-set blocks, feature cache, graph, environment,
feature-matching starts and validation images) whose training data are the tables of
:mod:`ppd.rl.counterfactual` instead of replay buffers. Missing table shards are generated in ``setup``
(or beforehand, in one or more processes, by ``python -m ppd.counterfactual --config ...``); existing ones
are reused. A fraction of the training *images* (``holdout``) is kept apart from the fit to measure how
well Q ranks removals on unseen images (``val/table_*``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCacheConfig
from ppd.data.replay import ReplayDataModule
from ppd.env.prompt_env import SAM_NODE_FEATURES
from ppd.rl.counterfactual import load_tables, write_tables

log = logging.getLogger(__name__)

TABLE_KEYS = ("image_ids", "status", "rewards", "sam")


class CounterfactualDataModule(ReplayDataModule):
    """Training images, their counterfactual reward tables, and the dev images of validation.

    Args:
        train: training data set(s) (see :class:`ReplayDataModule`).
        val: dev data set(s): validation refines their FM prompts (``val/fm_gain``).
        cache: feature-cache / encoder settings.
        grid: node grid side ``G``.
        k_feature: neighbours of the feature relation.
        k_physical: neighbours of the physical relation.
        feature_matching: FM options of the start states (:func:`ppd.env.prompts.prompts_from_reference`).
        tables: table folder (shared by every run with the same settings).
        references_per_image: FM start states per training image.
        oracle_steps: removals per trajectory (labelled states per start: at most ``oracle_steps + 1``).
        explore: probability of a random removal instead of the greedy oracle's along a trajectory.
        perturb: probability that an FM start is randomly perturbed.
        shard_size: images per table shard.
        max_states: fit on at most this many states (the first ones of a seeded permutation; learning
            curves); ``None`` = all.
        holdout: fraction of the training images whose states are kept apart (``val/table_*``).
        fit_datasets: indices into ``train`` of the data sets whose states are fitted (``None`` = all); the
            tables stay those of the whole ``train`` list (unseen-domain runs reuse them).
        generate_missing: generate missing table shards in ``setup``; ``False``: fit on the shards present
            (e.g. while ``python -m ppd.counterfactual`` is still writing the rest).
        sam_inputs: add SAM's current prediction to the node inputs (:data:`SAM_NODE_FEATURES`).
        batch_size: states per optimiser step.
        decoder_backend: SAM decoder backend of the environments (``onnx_cached`` is the fastest on CPU).
        seed: seed of the tables, the hold-out split and the validation FM references.
    """

    def __init__(
        self,
        train: DatasetConfig | list[DatasetConfig],
        val: DatasetConfig | list[DatasetConfig] | None = None,
        cache: FeatureCacheConfig | None = None,
        grid: int = 16,
        k_feature: int = 8,
        k_physical: int = 8,
        feature_matching: dict[str, Any] | None = None,
        tables: str = "runs/cf_tables",
        references_per_image: int = 2,
        oracle_steps: int = 4,
        explore: float = 0.3,
        perturb: float = 0.25,
        shard_size: int = 32,
        max_states: int | None = None,
        holdout: float = 0.1,
        fit_datasets: list[int] | None = None,
        generate_missing: bool = True,
        sam_inputs: bool = True,
        batch_size: int = 32,
        decoder_backend: str = "onnx_cached",
        seed: int = 0,
    ) -> None:
        super().__init__(
            train=train,
            val=val,
            cache=cache,
            grid=grid,
            k_feature=k_feature,
            k_physical=k_physical,
            budget_range=(1, 1),
            buffer_capacity=1,
            warm_start_steps=0,
            batch_size=batch_size,
            decoder_backend=decoder_backend,
            feature_matching=feature_matching,
            seed=seed,
        )
        for name, value in (("explore", explore), ("perturb", perturb), ("holdout", holdout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name} must lie in [0, 1), got {value}")
        if references_per_image < 1 or oracle_steps < 0 or shard_size < 1:
            raise ValueError(
                "data.references_per_image >= 1, data.oracle_steps >= 0 and data.shard_size >= 1 expected, got "
                f"{references_per_image}, {oracle_steps}, {shard_size}"
            )
        if max_states is not None and max_states < 1:
            raise ValueError(f"data.max_states must be None or >= 1, got {max_states}")
        self.tables = Path(tables)
        self.references_per_image = references_per_image
        self.oracle_steps = oracle_steps
        self.explore = explore
        self.perturb = perturb
        self.shard_size = shard_size
        self.max_states = max_states
        self.holdout = holdout
        if fit_datasets is not None and (
            not fit_datasets or any(not 0 <= int(i) < len(self.train_cfgs) for i in fit_datasets)
        ):
            raise ValueError(
                f"data.fit_datasets {fit_datasets}: expected indices in [0, {len(self.train_cfgs)}) of data.train"
            )
        self.fit_datasets = None if fit_datasets is None else sorted({int(i) for i in fit_datasets})
        self.sam_inputs = sam_inputs
        self.generate_missing = generate_missing
        self.fit_table: dict[str, torch.Tensor] = {}
        self.holdout_table: dict[str, torch.Tensor] = {}
        self.decodes = 0
        #: valid (state, removal) pairs with an exact reward in the fitted states (counted once in ``setup``)
        self.labelled_actions = 0

    @property
    def feature_dim(self) -> int:
        """Q-network input width: the PPD node features (+ SAM's :data:`SAM_NODE_FEATURES` with ``sam_inputs``)."""
        return super().feature_dim + (len(SAM_NODE_FEATURES) if self.sam_inputs else 0)

    def table_settings(self) -> dict[str, Any]:
        """Everything the tables depend on (stored in every shard; other settings need another folder)."""
        return {
            "train": [f"{c.root}|{c.kind}|{c.split}" for c in self.train_cfgs],
            "grid": self.grid,
            "sam_variant": self.cache_cfg.sam_variant,
            "dino": f"{self.cache_cfg.dino_name}@{self.cache_cfg.dino_resolution}",
            "decoder_backend": self.decoder_backend,
            "feature_matching": dict(sorted(self.fm_options.items())),
            "references_per_image": self.references_per_image,
            "oracle_steps": self.oracle_steps,
            "explore": self.explore,
            "perturb": self.perturb,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }

    def fm_starts(self, image_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """FM start states of training images, each from a random reference of its own data set."""
        return self.feature_matching_starts(image_ids, generator, "train")

    def write_tables(self, worker: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, float]:
        """Generate the missing table shards (``worker=(i, n)``: only shards ``k % n == i``)."""
        if self.env is None:
            self.setup_images()
        return write_tables(
            self.tables,
            self.env,
            self.train_stems,
            self.fm_starts,
            self.table_settings(),
            seed=self.seed,
            shard_size=self.shard_size,
            worker=worker,
            progress=progress,
            references_per_image=self.references_per_image,
            steps=self.oracle_steps,
            explore=self.explore,
            perturb=self.perturb,
        )

    def setup_images(self) -> None:
        """Images, features, environments and FM pools (no tables)."""
        if self._rank()[1] > 1:
            raise ValueError("CounterfactualDataModule: one process (devices: 1); the tables are small")
        ReplayDataModule.setup(self)

    def setup(self, stage: str | None = None) -> None:
        if self.fit_table:
            return
        self.setup_images()
        stats = self.write_tables(progress=True) if self.generate_missing else {"shards_written": 0}
        if stats["shards_written"]:
            log.info(
                "counterfactual tables: %d shards, %d states, %d decodes in %.0f s (%.1f decodes/s)",
                stats["shards_written"],
                stats["states"],
                stats["decodes"],
                stats["seconds"],
                stats["decodes"] / max(stats["seconds"], 1e-9),
            )
        tab = load_tables(self.tables, self.table_settings(), self.train_stems)
        self.decodes = int(tab.pop("decodes"))
        g = torch.Generator().manual_seed(self.seed + 7)
        n_img = len(self.train_stems)
        held = torch.randperm(n_img, generator=g)[: int(round(self.holdout * n_img))]
        is_held = torch.zeros(n_img, dtype=torch.bool)
        is_held[held] = True
        h = is_held[tab["image_ids"]]
        keep = torch.ones_like(h)
        if self.fit_datasets is not None:
            keep = torch.isin(self.train_groups[tab["image_ids"]], torch.tensor(self.fit_datasets))
        fit_idx = (~h & keep).nonzero().squeeze(1)
        fit_idx = fit_idx[torch.randperm(len(fit_idx), generator=g)]
        if self.max_states is not None:
            fit_idx = fit_idx[: self.max_states]
        self.fit_table = {k: tab[k][fit_idx] for k in TABLE_KEYS}
        self.holdout_table = {k: tab[k][h & keep] for k in TABLE_KEYS}
        self.labelled_actions = int((~torch.isnan(self.fit_table["rewards"])).sum())
        log.info(
            "counterfactual tables %s: %d states to fit (%d labelled actions), %d held-out states of %d images",
            self.tables,
            len(fit_idx),
            self.labelled_actions,
            int(h.sum()),
            int(is_held.sum()),
        )

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(*(self.fit_table[k] for k in TABLE_KEYS))
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=g, num_workers=0)

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        if self.val_env is not None:
            ids = torch.arange(len(self.val_env))
            loaders.append(DataLoader(list(ids.split(16)), batch_size=None, num_workers=0))
        if self.holdout_table and len(self.holdout_table["status"]):
            ds = TensorDataset(*(self.holdout_table[k] for k in TABLE_KEYS))
            loaders.append(DataLoader(ds, batch_size=64, shuffle=False, num_workers=0))
        return loaders
