"""``SegmentationDataModule``: image/mask pairs with cached SAM embeddings, for fine-tuning baselines.

Used by SAMPO (:mod:`ppd.tasks.sampo`) and Proxy Prompt. ``setup()`` fills the feature cache (each DDP rank
encodes its shard ``i % world_size == rank``, then all ranks meet at a barrier; see
:meth:`ppd.data.features.FeatureCache.ensure`) and keeps, per image, in memory:

* ``embedding`` ``(256, 64, 64)`` fp16 SAM image embedding,
* ``input_size`` ``(h, w)`` / ``original_size`` ``(H, W)``,
* ``gt_low`` ``(1, 256, 256)`` float GT in SAM's low-res logit frame (:func:`ppd.models.sam.gt_to_low_res`,
  zero in the padding) and ``valid`` ``(1, 256, 256)`` float (1 where the low-res frame covers the image),
* the full-resolution GT ``(H, W)`` bool for evaluation (:meth:`CachedSegmentationSet.gt_mask`).

With ``cache_embeddings=False`` (LoRA on the image encoder: the embedding changes while training) no SAM
embedding is stored; items carry the resized image ``image`` ``(3, 1024, 1024)`` uint8 (zero padded)
instead, which the task runs through the encoder itself.

Batches are dicts of stacked tensors (see :func:`collate_segmentation`). With ``support_size = K > 0``
every target image also gets K support pairs drawn from the *training* set without the target itself:
during training a fresh draw per ``(seed, epoch, target stem)``, for validation one fixed draw per
``(seed, target stem)``. The epoch reaches the dataset through the sampler (:class:`EpochSampler`), whose
``set_epoch`` Lightning calls at the start of every epoch, so the draws are the same with or without
dataloader workers.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCache, FeatureCacheConfig
from ppd.models.sam import IMAGE_SIZE, LOW_RES, gt_to_low_res, low_res_valid_size

log = logging.getLogger(__name__)

__all__ = [
    "CachedSegmentationSet",
    "EpochSampler",
    "SampleInfo",
    "SegmentationDataModule",
    "collate_segmentation",
]


@dataclass
class SampleInfo:
    """What an evaluation needs about one image.

    Attributes:
        stem: the data set's stem.
        original_size: ``(H, W)``.
        input_size: ``(h, w)`` inside SAM's 1024 frame.
        gt: ``(H, W)`` bool full-resolution ground truth.
    """

    stem: str
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    gt: np.ndarray


def _stem_seed(seed: int, stem: str, epoch: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(stem.encode()) * 31 + epoch * 104_729) % 2**63


class CachedSegmentationSet(Dataset):
    """In-memory per-image tensors of one split (built by :meth:`SegmentationDataModule.setup`).

    ``dataset[(index, epoch)]`` (or ``dataset[index]``, epoch 0) returns one item dict; support pairs come
    from ``support_pool`` (the training set) when ``support_size > 0``.

    Args:
        stems: ``(N,)`` stems.
        embeddings: N ``(256, 64, 64)`` fp16 embeddings, or ``None`` (not cached; ``images`` given).
        images: N ``(3, h, w)`` uint8 resized images (only without cached embeddings).
        input_sizes: N ``(h, w)``.
        original_sizes: N ``(H, W)``.
        gts: N ``(H, W)`` bool full-resolution masks.
        support_size: K support pairs per item (0 = none).
        support_pool: the set supports are drawn from (``None`` = this set).
        fixed_support: draw supports once per stem (validation) instead of per epoch (training).
        seed: base seed of the support draws.
    """

    def __init__(
        self,
        stems: list[str],
        embeddings: list[torch.Tensor] | None,
        images: list[torch.Tensor] | None,
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        gts: list[np.ndarray],
        support_size: int = 0,
        support_pool: CachedSegmentationSet | None = None,
        fixed_support: bool = False,
        seed: int = 0,
    ) -> None:
        self.stems = stems
        self.embeddings = embeddings
        self.images = images
        self.input_sizes = input_sizes
        self.original_sizes = original_sizes
        self.gts = gts
        self.support_size = support_size
        self.support_pool = support_pool
        self.fixed_support = fixed_support
        self.seed = seed
        self.gt_low: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        for gt, size in zip(gts, input_sizes, strict=True):
            h4, w4 = low_res_valid_size(size)
            g = torch.zeros(1, LOW_RES, LOW_RES)
            g[0, :h4, :w4] = gt_to_low_res(gt, size).float()
            v = torch.zeros(1, LOW_RES, LOW_RES)
            v[0, :h4, :w4] = 1.0
            self.gt_low.append(g)
            self.valid.append(v)

    def __len__(self) -> int:
        return len(self.stems)

    # -- accessors --------------------------------------------------------------------------------
    def index_of(self, stem: str) -> int:
        """Position of ``stem`` (``KeyError`` if absent)."""
        try:
            return self.stems.index(stem)
        except ValueError as err:
            raise KeyError(f"stem {stem!r} is not in this split") from err

    def info(self, index: int) -> SampleInfo:
        """Stem, sizes and full-resolution GT of item ``index``."""
        return SampleInfo(
            self.stems[index], self.original_sizes[index], self.input_sizes[index], self.gts[index]
        )

    def gt_mask(self, index: int) -> np.ndarray:
        """``(H, W)`` bool full-resolution GT of item ``index``."""
        return self.gts[index]

    def support_indices(self, index: int, epoch: int = 0) -> list[int]:
        """The K support indices (into ``support_pool``) of target ``index`` for ``epoch``.

        Drawn without replacement from the pool minus the target itself (matched by stem, so a training
        target never supports itself); deterministic per ``(seed, stem, epoch)`` (epoch ignored when
        ``fixed_support``).
        """
        pool = self.support_pool if self.support_pool is not None else self
        stem = self.stems[index]
        cand = [i for i, s in enumerate(pool.stems) if s != stem]
        if len(cand) < self.support_size:
            raise ValueError(
                f"support_size {self.support_size} needs at least {self.support_size} training images "
                f"besides the target, the training set has {len(cand)}"
            )
        g = torch.Generator().manual_seed(_stem_seed(self.seed, stem, 0 if self.fixed_support else epoch + 1))
        perm = torch.randperm(len(cand), generator=g)[: self.support_size]
        return [cand[int(i)] for i in perm]

    def _item(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "gt_low": self.gt_low[index],
            "valid": self.valid[index],
            "index": index,
            "input_size": torch.tensor(self.input_sizes[index]),
            "original_size": torch.tensor(self.original_sizes[index]),
        }
        if self.embeddings is not None:
            item["embedding"] = self.embeddings[index]
        else:
            assert self.images is not None
            img = self.images[index]
            pad = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
            pad[:, : img.shape[1], : img.shape[2]] = img
            item["image"] = pad
        return item

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if not isinstance(key, tuple) else key
        index = int(index)
        item = self._item(index)
        if self.support_size > 0:
            pool = self.support_pool if self.support_pool is not None else self
            sup = self.support_indices(index, int(epoch))
            items = [pool._item(i) for i in sup]
            item["support_index"] = torch.tensor(sup)
            item["support_gt_low"] = torch.stack([s["gt_low"] for s in items])
            item["support_valid"] = torch.stack([s["valid"] for s in items])
            key_ = "embedding" if "embedding" in item else "image"
            item[f"support_{key_}"] = torch.stack([s[key_] for s in items])
        return item


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)``; shuffled per ``(seed, epoch)`` when ``shuffle``.

    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``).
    """

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter([(i, self.epoch) for i in order])

    def __len__(self) -> int:
        return self.n


def collate_segmentation(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack item dicts into a batch.

    Returns:
        ``embedding`` ``(B, 256, 64, 64)`` fp16 (or ``image`` ``(B, 3, 1024, 1024)`` uint8),
        ``gt_low`` / ``valid`` ``(B, 1, 256, 256)`` float, ``index`` ``(B,)`` long, ``input_size`` /
        ``original_size`` ``(B, 2)`` long, and with supports ``support_embedding`` ``(B, K, 256, 64, 64)``
        (or ``support_image``), ``support_gt_low`` / ``support_valid`` ``(B, K, 1, 256, 256)``,
        ``support_index`` ``(B, K)``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, torch.Tensor] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.tensor(vals) if isinstance(vals[0], int) else torch.stack(vals)
    return out


class SegmentationDataModule(L.LightningDataModule):
    """Image/mask pairs over cached SAM embeddings.

    Args:
        train: training data set (``DatasetConfig``: root, kind, split, limit, options).
        val: validation data set (optional).
        cache: feature-cache settings (use the project's shared settings to hit the cache).
        batch_size: images per batch.
        num_workers: dataloader workers (0 = main process; the data are in memory anyway).
        support_size: K support pairs per target image (0 = none), drawn from the training set.
        cache_embeddings: keep cached SAM embeddings (default); ``False`` keeps resized images instead,
            for LoRA on the image encoder (then nothing is cached and every step runs the encoder).
        shuffle: shuffle the training set each epoch (seeded).
        seed: base seed (shuffling, support draws).
    """

    def __init__(
        self,
        train: DatasetConfig,
        val: DatasetConfig | None = None,
        cache: FeatureCacheConfig | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        support_size: int = 0,
        cache_embeddings: bool = True,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if support_size < 0:
            raise ValueError(f"support_size must be >= 0, got {support_size}")
        self.train_cfg = train
        self.val_cfg = val
        self.cache_cfg = cache or FeatureCacheConfig()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.support_size = support_size
        self.cache_embeddings = cache_embeddings
        self.shuffle = shuffle
        self.seed = seed
        self.train_data: CachedSegmentationSet | None = None
        self.val_data: CachedSegmentationSet | None = None

    @property
    def feature_dim(self) -> int:
        """DINOv2 width + 5 (linked by :class:`ppd.fit.PPDCLI` into ``model.feature_dim``; unused here)."""
        from ppd.data.replay import FEATURE_DIMS

        return FEATURE_DIMS.get(self.cache_cfg.dino_name, 0) + 5

    # -- setup ------------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _load(self, cfg: DatasetConfig, cache: FeatureCache | None) -> dict[str, Any]:
        ds = cfg.build()
        if len(ds) == 0:
            raise ValueError(f"data set {cfg.root} is empty")
        rank, _ = self._rank()
        if cache is not None:
            cache.ensure(ds, progress=rank == 0)
        from segment_anything.utils.transforms import ResizeLongestSide

        resize = ResizeLongestSide(IMAGE_SIZE)
        out: dict[str, Any] = {
            "stems": [],
            "embeddings": [] if cache is not None else None,
            "images": None if cache is not None else [],
            "input_sizes": [],
            "original_sizes": [],
            "gts": [],
        }
        for i in range(len(ds)):
            s = ds[i]
            out["stems"].append(s.stem)
            out["gts"].append(s.mask)
            out["original_sizes"].append(s.size)
            if cache is not None:
                f = cache.get(s.image)
                out["embeddings"].append(f.sam_embedding)
                out["input_sizes"].append(tuple(f.input_size))
            else:
                img = torch.as_tensor(resize.apply_image(s.image)).permute(2, 0, 1).contiguous()
                out["images"].append(img)
                out["input_sizes"].append((int(img.shape[1]), int(img.shape[2])))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        cache = FeatureCache(self.cache_cfg) if self.cache_embeddings else None
        self.train_data = CachedSegmentationSet(
            **self._load(self.train_cfg, cache), support_size=self.support_size, seed=self.seed
        )
        if self.val_cfg is not None:
            self.val_data = CachedSegmentationSet(
                **self._load(self.val_cfg, cache),
                support_size=self.support_size,
                support_pool=self.train_data,
                fixed_support=True,
                seed=self.seed,
            )
        rank, world = self._rank()
        log.info(
            "rank %d/%d: %d training images, %d validation images",
            rank,
            world,
            len(self.train_data),
            len(self.val_data) if self.val_data is not None else 0,
        )

    def split(self, name: str) -> CachedSegmentationSet:
        """The set-up ``"train"`` or ``"val"`` split (raises before :meth:`setup`)."""
        data = {"train": self.train_data, "val": self.val_data}.get(name)
        if data is None:
            raise RuntimeError(f"split {name!r} is not available (call setup() first; val needs a val block)")
        return data

    def sample_info(self, split: str, index: int) -> SampleInfo:
        """Stem, original/input size and full-resolution GT of item ``index`` of ``split``."""
        return self.split(split).info(index)

    # -- loaders ----------------------------------------------------------------------------------
    def _loader(self, data: CachedSegmentationSet, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(data), shuffle, self.seed),
            collate_fn=collate_segmentation,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return self._loader(self.val_data, False)
