"""Statistics of the evaluation tables: percentile bootstrap of a mean and of paired differences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Hand-rolled (a few lines of numpy) because ``scipy`` is not a dependency; the resampling uses a
    seeded ``numpy.random.Generator``, so the interval is deterministic.

    Args:
        values: ``(n,)`` per-image values.
        resamples: number of bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: RNG seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(resamples), v.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarise(
    values: Sequence[float] | np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """``(mean, (low, high))`` of per-image values (``nan`` mean for none)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    mean = float(v.mean()) if v.size else float("nan")
    return mean, bootstrap_ci(v, resamples, confidence, seed)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Mean and bootstrap interval of the per-image difference ``a - b`` (same images, same order).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have equal shapes, got {a.shape} and {b.shape}")
    return summarise(a - b, resamples, confidence, seed)
