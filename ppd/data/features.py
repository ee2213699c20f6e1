"""On-disk feature cache: SAM image embeddings and DINOv2 patch tokens, computed once per image.

Layout under ``root``::

    sam/<sam_variant>/<key>.pt              {"embedding": (256, 64, 64) fp16, "input_size": (2,), "original_size": (2,)}
    dino/<dino_name>_<resolution>_v2/<key>.pt  {"tokens": (G, G, C) fp16}

``key`` is the SHA-256 of the decoded pixels (shape + bytes), so renaming or re-encoding the same pixels
hits the cache while a changed image misses. Entries are written to a temporary file in the same folder
and renamed into place (``os.replace`` is atomic), so a crash never leaves a half-written entry. An entry
that fails to load (corrupt disk, foreign file) is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ppd.io import atomic_torch_save
from ppd.types import CachedFeatures

__all__ = ["CachedFeatures", "FeatureCache", "FeatureCacheConfig", "atomic_torch_save", "image_key"]

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$PPD_CACHE/features`` or ``~/.cache/ppd/features``."""
    return Path(os.environ.get("PPD_CACHE", Path.home() / ".cache" / "ppd")) / "features"


def image_key(image: np.ndarray) -> str:
    """Content hash of an ``(H, W, 3)`` uint8 image (shape and pixel bytes)."""
    h = hashlib.sha256()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:32]


@dataclass
class FeatureCacheConfig:
    """Which encoders fill the cache and where it lives.

    Attributes:
        root: cache folder; ``None`` = ``$PPD_CACHE/features`` (``~/.cache/ppd/features``).
        sam_variant: ``vit_t`` (MobileSAM), ``vit_b``/``vit_l``/``vit_h``, or ``tiny`` (random, tests).
        sam_checkpoint: ``"default"`` (named weights via :mod:`ppd.weights`), a path, or ``None`` (random).
        dino_name: ``dinov2_vits14`` etc. or ``tiny`` (random, tests).
        dino_resolution: DINOv2 input side in pixels (multiple of 14); token grid = resolution / 14.
        dino_pretrained: load DINOv2 weights.
        device: where the encoders run.
    """

    root: str | None = None
    sam_variant: str = "vit_t"
    sam_checkpoint: str | None = "default"
    dino_name: str = "dinov2_vits14"
    dino_resolution: int = 224
    dino_pretrained: bool = True
    device: str = "cpu"


class FeatureCache:
    """Compute-or-load SAM embeddings and DINOv2 tokens per image. Encoders are built lazily."""

    def __init__(self, config: FeatureCacheConfig | None = None, **overrides: Any) -> None:
        cfg = FeatureCacheConfig(**vars(config)) if config else FeatureCacheConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown FeatureCacheConfig field {k!r}")
            setattr(cfg, k, v)
        self.config = cfg
        self.root = Path(cfg.root) if cfg.root else default_cache_root()
        self.sam_dir = self.root / "sam" / cfg.sam_variant
        # "v2": position embedding resampled without antialiasing (see ppd.models.dinov2.build_dinov2)
        self.dino_dir = self.root / "dino" / f"{cfg.dino_name}_{cfg.dino_resolution}_v2"
        self._sam_encoder: Any = None
        self._dino: torch.nn.Module | None = None
        self.hits = 0
        self.misses = 0

    # -- encoders (built on first miss) -----------------------------------------------------------
    @property
    def sam_encoder(self) -> Any:
        """The :class:`ppd.models.sam.SamImageEncoder` (built lazily)."""
        if self._sam_encoder is None:
            from ppd.models.sam import SamImageEncoder, build_sam

            sam = build_sam(self.config.sam_variant, self.config.sam_checkpoint).to(self.config.device)
            self._sam_encoder = SamImageEncoder(sam)
        return self._sam_encoder

    @property
    def dino(self) -> torch.nn.Module:
        """The DINOv2 model (built lazily)."""
        if self._dino is None:
            from ppd.models.dinov2 import build_dinov2

            self._dino = build_dinov2(
                self.config.dino_name, self.config.dino_pretrained, img_size=self.config.dino_resolution
            ).to(self.config.device)
        return self._dino

    # -- entries ----------------------------------------------------------------------------------
    def _load(self, path: Path, required: Sequence[str]) -> dict[str, torch.Tensor] | None:
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or any(k not in entry for k in required):
                raise ValueError(f"missing fields, expected {list(required)}")
            return entry
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            warnings.warn(f"corrupt feature-cache entry {path} ({err}); recomputing it", stacklevel=3)
            path.unlink(missing_ok=True)
            return None

    def _sam_entry(self, image: np.ndarray, key: str) -> dict[str, torch.Tensor]:
        path = self.sam_dir / f"{key}.pt"
        entry = self._load(path, ("embedding", "input_size", "original_size"))
        if entry is None:
            enc = self.sam_encoder(image)
            entry = {
                "embedding": enc.embedding.to(torch.float16),
                "input_size": torch.tensor(enc.input_size),
                "original_size": torch.tensor(enc.original_size),
            }
            atomic_torch_save(entry, path)
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _dino_entry(self, image: np.ndarray, key: str) -> dict[str, torch.Tensor]:
        path = self.dino_dir / f"{key}.pt"
        entry = self._load(path, ("tokens",))
        if entry is None:
            from ppd.models.dinov2 import patch_tokens

            tokens = patch_tokens(self.dino, image, self.config.dino_resolution)
            entry = {"tokens": tokens.to(torch.float16)}
            atomic_torch_save(entry, path)
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def get(self, image: np.ndarray, key: str | None = None) -> CachedFeatures:
        """Features of one image, computed and stored on a miss.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            key: precomputed :func:`image_key` (optional).

        Returns:
            The :class:`CachedFeatures`.
        """
        key = key or image_key(image)
        s = self._sam_entry(image, key)
        d = self._dino_entry(image, key)
        return CachedFeatures(
            sam_embedding=s["embedding"],
            input_size=(int(s["input_size"][0]), int(s["input_size"][1])),
            original_size=(int(s["original_size"][0]), int(s["original_size"][1])),
            dino_tokens=d["tokens"],
            key=key,
        )

    def contains(self, image: np.ndarray) -> bool:
        """Whether both entries of ``image`` are present (not verified)."""
        key = image_key(image)
        return (self.sam_dir / f"{key}.pt").exists() and (self.dino_dir / f"{key}.pt").exists()

    def ensure(
        self,
        dataset: Any,
        progress: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> dict[str, int]:
        """Fill the cache for every sample of ``dataset`` (indexable, items with ``.image``).

        Under ``torch.distributed`` each rank encodes the shard ``i % world_size == rank`` and then all
        ranks meet at a barrier, so afterwards every rank can read every entry.

        Returns:
            ``{"hits": ..., "misses": ..., "images": ...}`` counted on this rank (an image counts one
            hit or miss per encoder).
        """
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if dist else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if dist else 1
        hits0, misses0, n = self.hits, self.misses, 0
        items = list(range(len(dataset)))[rank::world_size]
        bar = tqdm(items, desc=f"feature cache (rank {rank})", disable=not progress, unit="img")
        for i in bar:
            self.get(dataset[i].image)
            n += 1
            bar.set_postfix(hits=self.hits - hits0, misses=self.misses - misses0)
        if dist:
            torch.distributed.barrier()
        return {"hits": self.hits - hits0, "misses": self.misses - misses0, "images": n}
