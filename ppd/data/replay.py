"""``ReplayDataModule``: training images, feature cache and batched environment of PPD training.

Each DDP rank is its own actor: it owns the shard ``image_index % world_size == rank`` of the training
images and its own :class:`PromptEnv`; the replay buffers and their sampling RNG belong to the task's
:class:`ppd.rl.actor.Actor` (the replay options ``buffer_capacity``, ``save_buffers``, ``warm_start_steps``,
``batch_size``, ``sample_roles`` stay here as YAML keys). The train dataloader only paces training: a fixed
number of steps per epoch (the same on every rank), so all ranks take the same number of optimiser steps
and DDP's gradient all-reduce never waits on a rank that has run out of data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCache, FeatureCacheConfig
from ppd.env.prompt_env import PromptEnv, build_env
from ppd.env.prompts import ideal_prompts, mask_on_grid, prompts_from_reference
from ppd.types import CachedFeatures

log = logging.getLogger(__name__)

FEATURE_DIMS = {
    "dinov2_vits14": 384,
    "dinov2_vitb14": 768,
    "dinov2_vitl14": 1024,
    "dinov2_vitg14": 1536,
    "tiny": 48,
}


def _as_list(value: DatasetConfig | list[DatasetConfig], field: str) -> list[DatasetConfig]:
    """One data-set config or a non-empty list of them, as a list (one-line error otherwise)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{field}: expected a data set or a non-empty list of data sets")
    for i, item in enumerate(items):
        if not isinstance(item, DatasetConfig):
            raise ValueError(f"{field}[{i}]: expected a data-set block (root, kind, split), got {item!r}")
    return items


class ReplayBatches(IterableDataset):
    """Yields ``batches`` empty steps per epoch: the task samples the Actor's replay buffers itself
    (``PPDTask.training_step``)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        for _ in range(self.batches):
            yield {}

    def __len__(self) -> int:
        return self.batches


class ReplayDataModule(L.LightningDataModule):
    """Images, cached features, environment and replay buffers for PPD training.

    Args:
        train: training data set, or a list of them (their union; feature-matching start states draw the
            reference from the same data set as the target).
        val: held-apart validation data set (optional), or a list of them.
        cache: feature-cache / encoder settings.
        grid: node grid side G (N = G*G candidate prompts).
        k_feature: neighbours in the feature relation.
        k_physical: neighbours in the physical relation.
        ideal_interval: sampling interval of the ideal prompt grid (in nodes).
        ideal_max_pos: cap on ideal positive prompts (None = all).
        ideal_max_neg: cap on ideal negative prompts (None = all).
        envs_per_rank: episodes run in parallel on each rank.
        budget_range: per-episode step budget range ``[low, high]`` (paper: 50-300).
        buffer_capacity: transitions per buffer.
        warm_start_steps: random-policy environment steps (per role, per rank) before training.
        batch_size: replay batch size (paper: 128).
        batches_per_epoch: optimiser steps per epoch.
        val_limit: use at most this many validation images (None = all).
        decode_chunk: prompt sets (of equal size) per SAM decoder call.
        decoder_backend: ``"torch"`` or ``"onnx"`` (ONNX Runtime, CPU only, ~2x faster decodes on CPU).
        save_buffers: keep the replay buffers in checkpoints (large; saved by the task's Actor).
        sample_roles: ``active`` (default): each training step samples only the buffer of the role being
            trained; ``both``: each step samples both buffers (the original behaviour; the extra sample is
            discarded; drawn after the step's environment step, where the loader used to draw it one step
            ahead, so ``both`` runs differ from those before the buffers moved into the Actor).
        feature_matching: options of the feature-matching start states
            (:func:`ppd.env.prompts.prompts_from_reference`: ``metric``, ``max_pos``, ``max_neg``,
            ``bidirectional``, ``cap``); used when ``PPDTask.defence_starts`` gives them weight.
        seed: base seed (each rank adds its rank).
    """

    def __init__(
        self,
        train: DatasetConfig | list[DatasetConfig],
        val: DatasetConfig | list[DatasetConfig] | None = None,
        cache: FeatureCacheConfig | None = None,
        grid: int = 16,
        k_feature: int = 8,
        k_physical: int = 8,
        ideal_interval: int = 1,
        ideal_max_pos: int | None = 10,
        ideal_max_neg: int | None = 10,
        envs_per_rank: int = 4,
        budget_range: tuple[int, int] = (50, 300),
        buffer_capacity: int = 50_000,
        warm_start_steps: int = 256,
        batch_size: int = 128,
        batches_per_epoch: int = 100,
        val_limit: int | None = None,
        decode_chunk: int = 1,
        decoder_backend: str = "torch",
        save_buffers: bool = False,
        sample_roles: str = "active",
        feature_matching: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_cfgs = _as_list(train, "data.train")
        self.val_cfgs = _as_list(val, "data.val") if val is not None else []
        self.fm_options: dict[str, Any] = dict(feature_matching or {"max_pos": 10, "max_neg": 10})
        self.cache_cfg = cache or FeatureCacheConfig()
        if self.cache_cfg.dino_name not in FEATURE_DIMS:
            raise ValueError(
                f"cache.dino_name {self.cache_cfg.dino_name!r} unknown; expected {sorted(FEATURE_DIMS)}"
            )
        self.grid, self.k_feature, self.k_physical = grid, k_feature, k_physical
        self.ideal_interval, self.ideal_max_pos, self.ideal_max_neg = (
            ideal_interval,
            ideal_max_pos,
            ideal_max_neg,
        )
        self.envs_per_rank = envs_per_rank
        self.budget_range = (int(budget_range[0]), int(budget_range[1]))
        if not 1 <= self.budget_range[0] <= self.budget_range[1] <= grid * grid:
            raise ValueError(
                f"budget_range {list(budget_range)}: expected 1 <= low <= high <= {grid * grid} "
                f"(the number of nodes of a {grid}x{grid} grid)"
            )
        self.buffer_capacity, self.warm_start_steps = buffer_capacity, warm_start_steps
        self.batch_size, self.batches_per_epoch, self.val_limit = batch_size, batches_per_epoch, val_limit
        self.decode_chunk, self.decoder_backend = decode_chunk, decoder_backend
        self.save_buffers, self.seed = save_buffers, seed
        if sample_roles not in ("active", "both"):
            raise ValueError(f"data.sample_roles must be 'active' or 'both', got {sample_roles!r}")
        self.sample_roles = sample_roles
        self.env: PromptEnv | None = None
        self.val_env: PromptEnv | None = None
        self.ideal: torch.Tensor | None = None
        self.val_ideal: torch.Tensor | None = None
        #: ``(num_images,)`` index of each training image's data set in ``train`` (FM reference pools)
        self.train_groups: torch.Tensor | None = None
        #: ``(num_images, N)`` bool: GT mask at each node centre of each training image
        self.node_fg: torch.Tensor | None = None
        #: per split ("train"/"val"): (features, masks, data-set index per image) for FM start states
        self._pools: dict[str, tuple[list[CachedFeatures], list[np.ndarray], torch.Tensor]] = {}
        self.sam: torch.nn.Module | None = None

    @property
    def train_cfg(self) -> DatasetConfig:
        """The training data set (the first one when ``train`` lists several)."""
        return self.train_cfgs[0]

    @property
    def val_cfg(self) -> DatasetConfig | None:
        """The validation data set (the first one when ``val`` lists several), or ``None``."""
        return self.val_cfgs[0] if self.val_cfgs else None

    def train_sample(self, image_id: int) -> Any:
        """The dataset sample (image, mask, stem) of a training image id of this rank."""
        cfg = (
            self.train_cfgs[int(self.train_groups[image_id])]
            if self.train_groups is not None
            else self.train_cfg
        )
        stem = self.train_stems[image_id].split("/")[-1]
        ds = cfg.build()
        return next(s for s in (ds[i] for i in range(len(ds))) if s.stem == stem)

    @property
    def feature_dim(self) -> int:
        """Q-network input width: DINOv2 channels + 2 (position) + 3 (status one-hot)."""
        return FEATURE_DIMS[self.cache_cfg.dino_name] + 5

    @property
    def num_nodes(self) -> int:
        return self.grid * self.grid

    # -- setup ----------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _load(
        self, cfgs: list[DatasetConfig], cache: FeatureCache, shard: bool, limit: int | None
    ) -> tuple[list[CachedFeatures], list[np.ndarray], list[str], list[int]]:
        """Features, masks, stems and data-set index of the (sharded) images of one or more data sets."""
        feats, masks, stems, groups = [], [], [], []
        rank, world = self._rank()
        for gi, cfg in enumerate(cfgs):
            ds = cfg.build()
            if len(ds) == 0:
                raise ValueError(f"data set {cfg.root} is empty")
            cache.ensure(ds, progress=rank == 0)
            idx = list(range(len(ds)))
            if limit is not None:
                idx = idx[:limit]
            if shard:
                idx = idx[rank::world]
                if not idx:
                    raise ValueError(
                        f"{cfg.root}: {len(ds)} images cannot give every one of {world} ranks an image"
                    )
            for i in idx:
                s = ds[i]
                feats.append(cache.get(s.image))
                masks.append(s.mask)
                stems.append(s.stem if len(cfgs) == 1 else f"{Path(cfg.root).name}/{s.stem}")
                groups.append(gi)
        return feats, masks, stems, groups

    def _ideal(self, masks: list[np.ndarray]) -> torch.Tensor:
        out = []
        for i, m in enumerate(masks):
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            out.append(
                ideal_prompts(
                    m, self.grid, self.ideal_interval, self.ideal_max_pos, self.ideal_max_neg, generator=g
                )
            )
        return torch.stack(out).long()

    def _make_env(self, feats: list[CachedFeatures], masks: list[np.ndarray]) -> PromptEnv:
        graph = {"grid": self.grid, "k_feature": self.k_feature, "k_physical": self.k_physical}
        return build_env(
            self.sam,
            feats,
            masks,
            graph,
            decode_chunk=self.decode_chunk,
            budget_range=self.budget_range,
            decoder_backend=self.decoder_backend,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.env is not None:
            return
        from ppd.models.sam import build_sam

        rank, world = self._rank()
        cache = FeatureCache(self.cache_cfg)
        self.sam = build_sam(self.cache_cfg.sam_variant, self.cache_cfg.sam_checkpoint)
        feats, masks, self.train_stems, groups = self._load(self.train_cfgs, cache, shard=True, limit=None)
        self.env = self._make_env(feats, masks)
        self.ideal = self._ideal(masks)
        self.train_groups = torch.tensor(groups, dtype=torch.long)
        self.node_fg = torch.stack([mask_on_grid(m, self.grid).reshape(-1) for m in masks])
        self._pools["train"] = (feats, masks, self.train_groups)
        if self.val_cfgs:
            vf, vm, self.val_stems, vg = self._load(self.val_cfgs, cache, shard=True, limit=self.val_limit)
            self._pools["val"] = (vf, vm, torch.tensor(vg, dtype=torch.long))
            self.val_env = self._make_env(vf, vm)
            self.val_ideal = self._ideal(vm)
        log.info(
            "rank %d/%d: %d training images, %d validation images, grid %d",
            rank,
            world,
            len(self.env),
            len(self.val_env) if self.val_env else 0,
            self.grid,
        )

    # -- start states -------------------------------------------------------------------------------
    def feature_matching_starts(
        self, image_ids: torch.Tensor, generator: torch.Generator, split: str = "train"
    ) -> torch.Tensor:
        """Feature-matching prompts of images, each from a random reference of its own data set.

        The reference is another image of the same split (of this rank's shard) and the same data set as
        the target; a data set with a single image on this rank uses the image itself as its reference.

        Args:
            image_ids: ``(B,)`` image ids of the split's environment.
            generator: RNG of the reference draws.
            split: ``train`` or ``val``.

        Returns:
            ``(B, N)`` long prompt states (:func:`ppd.env.prompts.prompts_from_reference` with
            ``feature_matching`` options).
        """
        if split not in self._pools:
            raise RuntimeError(f"feature_matching_starts: no {split!r} images (call setup() first)")
        feats, masks, groups = self._pools[split]
        out = []
        for i in image_ids.tolist():
            pool = torch.nonzero(groups == groups[i]).reshape(-1)
            pool = pool[pool != i] if len(pool) > 1 else pool
            j = int(pool[torch.randint(len(pool), (1,), generator=generator)])
            st, _ = prompts_from_reference(
                feats[j].dino_tokens, masks[j], feats[i].dino_tokens, self.grid, **self.fm_options
            )
            out.append(st)
        return torch.stack(out).long()

    # -- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(ReplayBatches(self.batches_per_epoch), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_env is None:
            return []
        ids = torch.arange(len(self.val_env))
        return DataLoader(list(ids.split(max(1, self.envs_per_rank))), batch_size=None, num_workers=0)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"cache": asdict(self.cache_cfg)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: older checkpoints' replay ``generator`` / ``buffers`` entries here are read by
        ``PPDTask.on_load_checkpoint`` (the Actor owns them now)."""


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
