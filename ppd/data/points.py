"""Seeded sparse click sampling from a ground-truth mask (SAMPO prompt sets, "3 + 3 points" evaluation rows).

Points are ``(x, y)`` pixel coordinates (column, row) of the mask's own grid, as SAM expects before
:func:`ppd.models.sam.to_input_frame`. Sampling is uniform over the pixels of a region, without
replacement, and depends only on the mask and the ``torch.Generator`` state.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["POSITIVE", "NEGATIVE", "PAD", "pad_prompt_sets", "sample_points", "stem_generator"]

POSITIVE = 1
NEGATIVE = 0
PAD = -1  # SAM's "not a point" label


def _pick(region: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(min(n, |region|), 2)`` ``(x, y)`` of pixels drawn without replacement from a bool ``(H, W)`` region."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    if n <= 0 or ys.numel() == 0:
        return torch.zeros(0, 2)
    k = min(n, ys.numel())
    idx = torch.randperm(ys.numel(), generator=generator)[:k]
    return torch.stack([xs[idx], ys[idx]], dim=1).to(torch.float32)


def sample_points(
    mask: np.ndarray | torch.Tensor,
    n_pos: int,
    n_neg: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw positive clicks inside and negative clicks outside a binary mask.

    Args:
        mask: ``(H, W)`` bool (or 0/1) ground truth.
        n_pos: positive clicks wanted (fewer when the object has fewer pixels).
        n_neg: negative clicks wanted (fewer when the background has fewer pixels).
        generator: RNG; the same generator state gives the same points.

    Returns:
        ``points`` ``(K, 2)`` float ``(x, y)`` pixels and ``labels`` ``(K,)`` long (1 positive, 0 negative),
        positives first, ``K <= n_pos + n_neg``.
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(m.shape)}")
    if n_pos < 0 or n_neg < 0:
        raise ValueError(f"point counts must be >= 0, got n_pos={n_pos}, n_neg={n_neg}")
    pos = _pick(m, n_pos, generator)
    neg = _pick(~m, n_neg, generator)
    points = torch.cat([pos, neg], dim=0)
    labels = torch.cat(
        [
            torch.full((len(pos),), POSITIVE, dtype=torch.long),
            torch.full((len(neg),), NEGATIVE, dtype=torch.long),
        ]
    )
    return points, labels


def pad_prompt_sets(sets: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompt sets of different sizes, padding with SAM's "not a point" label ``-1``.

    Args:
        sets: list of ``(points (K_i, 2), labels (K_i,))``.

    Returns:
        ``points`` ``(S, K, 2)`` and ``labels`` ``(S, K)`` with ``K = max K_i`` (at least 1).
    """
    k = max([1] + [len(p) for p, _ in sets])
    pts = torch.zeros(len(sets), k, 2)
    lab = torch.full((len(sets), k), PAD, dtype=torch.long)
    for i, (p, lb) in enumerate(sets):
        pts[i, : len(p)] = p
        lab[i, : len(lb)] = lb
    return pts, lab


def stem_generator(seed: int, stem: str, salt: int = 0) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, stem, salt)`` (stable across processes and runs)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stem.encode()) + salt * 7919) % 2**63)
