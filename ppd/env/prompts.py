"""Prompt initialisers on the ``G x G`` node grid.

Every initialiser returns a prompt status per node, ``(N,)`` long with ``N = G * G`` and node
``i = row * G + col``: ``0`` = inactive, ``1`` = active positive, ``2`` = active negative
(see ``docs/architecture.md``). :func:`status_to_points` turns a status into SAM point prompts.

Masks are sampled at node centres ``x = (col + 0.5) * W / G``, ``y = (row + 0.5) * H / G``; the pixel
"nearest" to a centre is the one containing it, ``(floor(y), floor(x))``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ppd.env.fm_variants import FM_VARIANTS, class_matches, gfsam_matches, mutual_matches
from ppd.env.graph import node_positions, pool_tokens
from ppd.types import INACTIVE, NEGATIVE, POSITIVE

Metric = Literal["l2", "cosine"]
Variant = Literal["nearest", "paper", "mutual", "gfsam"]


# --------------------------------------------------------------------------------------------- helpers
def _as_mask(mask: torch.Tensor | np.ndarray, name: str = "mask") -> torch.Tensor:
    mask_t = torch.as_tensor(mask)
    if mask_t.dim() != 2:
        raise ValueError(f"{name}: expected a (H, W) mask, got shape {tuple(mask_t.shape)}")
    if mask_t.numel() == 0:
        raise ValueError(f"{name}: empty (H, W) = {tuple(mask_t.shape)}")
    return mask_t.bool()


def _flat_tokens(tokens: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[0] != tokens.shape[1]:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name}: expected square (G, G, C) patch tokens, got {shape}")
    g = int(tokens.shape[0])
    return tokens.reshape(g * g, -1).float(), g


def _check_grid(grid: int) -> None:
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid: expected a positive integer, got {grid!r}")


def _check_cap(value: int | None, name: str) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name}: expected None (no cap) or a non-negative integer, got {value}")


def _random_subset(nodes: torch.Tensor, cap: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """At most ``cap`` random elements of ``nodes`` (all of them if ``cap`` is None or not exceeded)."""
    if cap is None or nodes.numel() <= cap:
        return nodes
    perm = torch.randperm(nodes.numel(), generator=generator, device="cpu")[:cap]
    return nodes[perm.to(nodes.device)]


def _best_subset(nodes: torch.Tensor, score: torch.Tensor, cap: int | None) -> torch.Tensor:
    """At most ``cap`` elements of ``nodes`` with the smallest ``score`` (ties: smaller node index)."""
    if cap is None or nodes.numel() <= cap:
        return nodes
    order = torch.argsort(nodes, stable=True)  # make tie-breaking by node index explicit
    nodes, score = nodes[order], score[order]
    keep = torch.argsort(score, stable=True)[:cap]
    return nodes[keep]


# ----------------------------------------------------------------------------------------------- masks
def mask_on_grid(mask: torch.Tensor | np.ndarray, grid: int) -> torch.Tensor:
    """Ground-truth value at every node centre.

    Args:
        mask: ``(H, W)`` bool mask (numpy or torch).
        grid: node grid size ``G``.

    Returns:
        ``(G, G)`` bool, entry ``[row, col]`` = mask at the pixel containing that node's centre.
    """
    _check_grid(grid)
    mask_t = _as_mask(mask)
    H, W = mask_t.shape
    xy = node_positions(grid, H, W).double()
    cols = xy[:, 0].floor().long().clamp_(0, W - 1)
    rows = xy[:, 1].floor().long().clamp_(0, H - 1)
    return mask_t[rows.to(mask_t.device), cols.to(mask_t.device)].reshape(grid, grid).cpu()


def mask_fraction_on_grid(mask: torch.Tensor | np.ndarray, grid: int) -> torch.Tensor:
    """Fraction of each node's patch covered by the mask (adaptive average pooling).

    Args:
        mask: ``(H, W)`` bool mask.
        grid: node grid size ``G``.

    Returns:
        ``(G, G)`` float32 in ``[0, 1]``.
    """
    _check_grid(grid)
    mask_t = _as_mask(mask).float().cpu()
    return F.adaptive_avg_pool2d(mask_t[None, None], (grid, grid))[0, 0]


# ------------------------------------------------------------------------------------------ initialisers
def ideal_prompts(
    mask: torch.Tensor | np.ndarray,
    grid: int,
    interval: int = 1,
    max_pos: int | None = 10,
    max_neg: int | None = 10,
    generator: torch.Generator | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Ideal prompts (paper III-A-b): a regular sub-grid of nodes labelled by the ground truth.

    Nodes at rows and columns ``offset, offset + interval, offset + 2 * interval, ...`` become active:
    positive when their centre lies inside the mask, negative otherwise. The counts are then capped by
    uniform random subsampling.

    The uncapped dense grid is *not* ideal for SAM: on PH2 with MobileSAM, all points of a 16 x 16 grid
    (~76 positive / 180 negative) give mDSC 0.727, at most 10 + 10 random points 0.838 (DESIGN.md). Many
    negative points hurt SAM, hence the default caps of 10 + 10.

    Args:
        mask: ``(H, W)`` bool ground-truth mask.
        grid: node grid size ``G``.
        interval: sampling interval in nodes (``>= 1``).
        max_pos: cap on positive prompts; ``None`` = no cap.
        max_neg: cap on negative prompts; ``None`` = no cap.
        generator: CPU ``torch.Generator`` for the subsampling; ``None`` uses torch's global RNG.
        offset: first sampled row/column (``0 <= offset < interval``).

    Returns:
        ``(N,)`` long status.
    """
    _check_grid(grid)
    if interval < 1:
        raise ValueError(f"interval: expected an integer >= 1, got {interval}")
    if not 0 <= offset < max(interval, 1) or offset >= grid:
        raise ValueError(
            f"offset: expected 0 <= offset < min(interval, grid) = {min(interval, grid)}, got {offset}"
        )
    _check_cap(max_pos, "max_pos")
    _check_cap(max_neg, "max_neg")
    inside = mask_on_grid(mask, grid).reshape(-1)
    lines = torch.arange(offset, grid, interval)
    sampled = (lines[:, None] * grid + lines[None, :]).reshape(-1)
    pos = _random_subset(sampled[inside[sampled]], max_pos, generator)
    neg = _random_subset(sampled[~inside[sampled]], max_neg, generator)
    status = torch.zeros(grid * grid, dtype=torch.long)
    status[pos] = POSITIVE
    status[neg] = NEGATIVE
    return status


def _cross_distances(a: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``(Na, Nb)`` distances between rows of ``a (Na, C)`` and ``b (Nb, C)``."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"token channels differ: reference C = {a.shape[1]}, target C = {b.shape[1]}")
    if metric == "l2":
        # float64 matrix-multiply path: exact to ~1e-12, faster than the direct path (see graph.py).
        return torch.cdist(a.double(), b.double(), compute_mode="use_mm_for_euclid_dist").float()
    if metric == "cosine":
        return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")


def feature_matching_prompts(
    ref_tokens: torch.Tensor,
    ref_mask: torch.Tensor | np.ndarray,
    tgt_tokens: torch.Tensor,
    metric: Metric = "l2",
    bidirectional: bool = False,
    max_pos: int | None = 10,
    max_neg: int | None = 10,
    generator: torch.Generator | None = None,
    cap: Literal["best", "random"] = "best",
    variant: Variant = "nearest",
    max_points: int = 128,
    prune_above: int = 40,
    prune_keep: float = 0.5,
    hard_negatives: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One-shot prompts by matching patch features of a reference (image + mask) to a target.

    ``variant`` picks the point-selection rule (sources and details in :mod:`ppd.env.fm_variants`;
    :data:`ppd.env.fm_variants.FM_PRESETS` holds each source's recipe):

    - ``"nearest"`` (default, the project's original rule, PPO-style): every reference patch whose centre
      lies inside ``ref_mask`` (foreground) is matched to its nearest target patch, which becomes a
      positive candidate; every other reference patch likewise gives a negative candidate. A target patch
      hit by both classes is a *conflict* and is dropped. With ``bidirectional=True`` a match ``r -> t`` is
      kept only if the reference patch nearest to ``t`` has ``r``'s class (class-level mutual nearest
      neighbours; conflicts cannot survive it).
    - ``"paper"``: as ``nearest`` but only reference patches *fully* inside (foreground) or fully outside
      (background) the mask take part (the PPO/PPD code); use it uncapped (``max_pos = max_neg = None``).
    - ``"mutual"``: Matcher / GBMSeg forward + reverse bipartite matching with similarity pruning
      (``prune_above``, ``prune_keep``) and hard negatives (``hard_negatives``); use ``metric="cosine"``.
    - ``"gfsam"``: GF-SAM's foreground map with the background filter and adaptive
      ``k <= max_points`` positives, no negatives (always cosine; ``metric`` is ignored).

    When the reference mask covers no node centre (object smaller than a patch) the patches with the
    largest mask coverage are used as foreground (``info["ref_fg_fallback"]``). Caps keep, per class, the
    target patches with the best score (smallest match distance; ``cap="best"``, ties by node index,
    deterministic) or a random subset (``cap="random"``, uses ``generator``).

    Args:
        ref_tokens: ``(Gr, Gr, C)`` reference patch tokens.
        ref_mask: ``(H_r, W_r)`` bool reference mask.
        tgt_tokens: ``(G, G, C)`` target patch tokens.
        metric: ``"l2"`` (raw tokens) or ``"cosine"`` (``1 - cos``).
        bidirectional: apply the cycle check (``nearest`` and ``paper`` only).
        max_pos: cap on positives; ``None`` = no cap.
        max_neg: cap on negatives; ``None`` = no cap.
        generator: CPU generator for ``cap="random"``; ``None`` = global RNG.
        cap: ``"best"`` or ``"random"``.
        variant: ``"nearest"``, ``"paper"``, ``"mutual"`` or ``"gfsam"``.
        max_points: ``gfsam``: upper bound of the adaptive ``k``.
        prune_above: ``mutual``: pruning threshold on the number of kept pairs.
        prune_keep: ``mutual``: fraction kept by the pruning.
        hard_negatives: ``mutual``: add GBMSeg's hard negatives.

    Returns:
        ``status (G * G,)`` long and ``info`` with ints ``n_pos``, ``n_neg`` (after caps),
        ``n_pos_candidates``, ``n_neg_candidates`` (before caps), ``n_conflicts``, ``n_cycle_rejected``
        (matches removed by a reverse check), ``n_ref_fg``, ``n_ref_bg``, ``grid``, the ``variant`` and
        bools ``no_positive``, ``ref_fg_fallback``.
    """
    _check_cap(max_pos, "max_pos")
    _check_cap(max_neg, "max_neg")
    if cap not in ("best", "random"):
        raise ValueError(f"cap: expected 'best' or 'random', got {cap!r}")
    if variant not in FM_VARIANTS:
        raise ValueError(f"variant: expected one of {list(FM_VARIANTS)}, got {variant!r}")
    if bidirectional and variant not in ("nearest", "paper"):
        raise ValueError(f"bidirectional: only for variant 'nearest' or 'paper', not {variant!r}")
    if max_points < 1 or not 0.0 < prune_keep <= 1.0 or prune_above < 0:
        raise ValueError(
            f"max_points >= 1, 0 < prune_keep <= 1, prune_above >= 0 expected, got "
            f"{max_points}, {prune_keep}, {prune_above}"
        )
    ref, g_ref = _flat_tokens(ref_tokens, "ref_tokens")
    tgt, g_tgt = _flat_tokens(tgt_tokens, "tgt_tokens")
    if ref.shape[1] != tgt.shape[1]:
        raise ValueError(f"token channels differ: reference C = {ref.shape[1]}, target C = {tgt.shape[1]}")
    ref_mask_t = _as_mask(ref_mask, "ref_mask")
    frac = mask_fraction_on_grid(ref_mask_t, g_ref).reshape(-1).to(ref.device)
    ref_fg = mask_on_grid(ref_mask_t, g_ref).reshape(-1).to(ref.device)
    ref_used = torch.ones_like(ref_fg)
    if variant == "paper":
        ref_fg, ref_used = frac >= 1.0, (frac >= 1.0) | (frac <= 0.0)
    fallback = False
    if not ref_fg.any() and ref_mask_t.any():
        ref_fg = frac == frac.max()
        ref_used = ref_used | ref_fg
        fallback = True

    if variant == "gfsam":
        cand = gfsam_matches(ref, frac, tgt, max_points)
    elif variant == "mutual":
        cand = mutual_matches(
            _cross_distances(ref, tgt, metric), ref_fg, prune_above, prune_keep, hard_negatives
        )
    else:
        cand = class_matches(_cross_distances(ref, tgt, metric), ref_fg, ref_used, bidirectional)

    pos = torch.nonzero(torch.isfinite(cand.pos_score)).reshape(-1)
    neg = torch.nonzero(torch.isfinite(cand.neg_score)).reshape(-1)
    n_pos_cand, n_neg_cand = pos.numel(), neg.numel()
    if cap == "best":
        pos = _best_subset(pos, cand.pos_score[pos], max_pos)
        neg = _best_subset(neg, cand.neg_score[neg], max_neg)
    else:
        pos = _random_subset(pos, max_pos, generator)
        neg = _random_subset(neg, max_neg, generator)

    status = torch.zeros(tgt.shape[0], dtype=torch.long, device=tgt.device)
    status[pos] = POSITIVE
    status[neg] = NEGATIVE
    info: dict[str, Any] = {
        "n_pos": int(pos.numel()),
        "n_neg": int(neg.numel()),
        "n_pos_candidates": n_pos_cand,
        "n_neg_candidates": n_neg_cand,
        "n_conflicts": cand.n_conflicts,
        "n_cycle_rejected": cand.n_rejected,
        "n_ref_fg": int(ref_fg.sum()),
        "n_ref_bg": int((ref_used & ~ref_fg).sum()),
        "no_positive": pos.numel() == 0,
        "ref_fg_fallback": fallback,
        "grid": g_tgt,
        "variant": variant,
    }
    return status, info


def random_prompts(
    grid: int, n_pos: int, n_neg: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random distinct nodes, ``n_pos`` positive and ``n_neg`` negative.

    Args:
        grid: node grid size ``G``.
        n_pos: number of positive prompts.
        n_neg: number of negative prompts.
        generator: CPU generator; ``None`` = global RNG.

    Returns:
        ``(N,)`` long status.
    """
    _check_grid(grid)
    n = grid * grid
    if n_pos < 0 or n_neg < 0 or n_pos + n_neg > n:
        raise ValueError(
            f"random_prompts: expected n_pos, n_neg >= 0 and n_pos + n_neg <= {n}, got {n_pos}, {n_neg}"
        )
    perm = torch.randperm(n, generator=generator)
    status = torch.zeros(n, dtype=torch.long)
    status[perm[:n_pos]] = POSITIVE
    status[perm[n_pos : n_pos + n_neg]] = NEGATIVE
    return status


def click_prompts(
    points: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    grid: int,
    H: int,
    W: int,
) -> torch.Tensor:
    """Snap clicks to the nearest node centre.

    Args:
        points: ``(K, 2)`` click ``(x, y)`` in original-image pixels, within ``[0, W] x [0, H]``.
        labels: ``(K,)`` ``1`` = positive, ``0`` = negative, ``-1`` = padding (ignored).
        grid: node grid size ``G``.
        H: image height.
        W: image width.

    Returns:
        ``(N,)`` long status; a later click on the same node overwrites an earlier one.
    """
    _check_grid(grid)
    pts = torch.as_tensor(points, dtype=torch.float64).cpu()
    lab = torch.as_tensor(labels).long().cpu()
    if pts.dim() != 2 or pts.shape[1] != 2 or lab.shape != (pts.shape[0],):
        raise ValueError(
            f"click_prompts: expected points (K, 2) and labels (K,), got {tuple(pts.shape)} and {tuple(lab.shape)}"
        )
    if not torch.isin(lab, torch.tensor([-1, 0, 1])).all():
        raise ValueError(
            f"labels: expected values 1 (positive), 0 (negative) or -1 (padding), got {lab.tolist()}"
        )
    out = (pts[:, 0] < 0) | (pts[:, 0] > W) | (pts[:, 1] < 0) | (pts[:, 1] > H) | ~torch.isfinite(pts).all(1)
    if out.any():
        raise ValueError(f"points: clicks {pts[out].tolist()} lie outside the image (W={W}, H={H})")
    # Nearest centre (c + 0.5) * W / G  <=>  c = floor(x * G / W), clamped for clicks on the far border.
    cols = (pts[:, 0] * grid / W).floor().long().clamp_(0, grid - 1)
    rows = (pts[:, 1] * grid / H).floor().long().clamp_(0, grid - 1)
    status = torch.zeros(grid * grid, dtype=torch.long)
    for node, label in zip((rows * grid + cols).tolist(), lab.tolist(), strict=True):
        if label >= 0:
            status[node] = POSITIVE if label == 1 else NEGATIVE
    return status


def persam_prompts(
    ref_tokens: torch.Tensor, ref_mask: torch.Tensor | np.ndarray, tgt_tokens: torch.Tensor
) -> torch.Tensor:
    """Training-free PerSAM-style prompts: one positive and one negative node.

    The reference's target feature is the mean of its tokens weighted by each patch's mask coverage
    (PerSAM averages the encoder features inside the downsampled mask). The target node most similar to
    it (cosine) becomes positive, the least similar negative.

    Args:
        ref_tokens: ``(Gr, Gr, C)`` reference tokens.
        ref_mask: ``(H_r, W_r)`` bool reference mask (must not be empty).
        tgt_tokens: ``(G, G, C)`` target tokens.

    Returns:
        ``(G * G,)`` long status with exactly one positive and one negative node (``G > 1``).
    """
    ref, g_ref = _flat_tokens(ref_tokens, "ref_tokens")
    tgt, _ = _flat_tokens(tgt_tokens, "tgt_tokens")
    if ref.shape[1] != tgt.shape[1]:
        raise ValueError(f"token channels differ: reference C = {ref.shape[1]}, target C = {tgt.shape[1]}")
    weight = mask_fraction_on_grid(ref_mask, g_ref).reshape(-1).to(ref)
    if weight.sum() <= 0:
        raise ValueError("ref_mask: empty reference mask, PerSAM needs a foreground region")
    proto = (weight[:, None] * ref).sum(0) / weight.sum()
    sim = F.normalize(tgt, dim=1) @ F.normalize(proto, dim=0)
    if tgt.shape[0] < 2:
        raise ValueError("tgt_tokens: PerSAM prompts need at least 2 nodes")
    status = torch.zeros(tgt.shape[0], dtype=torch.long, device=tgt.device)
    status[sim.argmin()] = NEGATIVE
    status[sim.argmax()] = POSITIVE  # written last: wins if all similarities are equal
    return status


# -------------------------------------------------------------------------------------- status -> points
def status_to_points(status: torch.Tensor, grid: int, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM point prompts of the active nodes, in node order.

    Args:
        status: ``(N,)`` status with ``N = G * G``.
        grid: node grid size ``G``.
        H: original image height.
        W: original image width.

    Returns:
        ``points (K, 2)`` float32 ``(x, y)`` node centres in original pixels and ``labels (K,)`` long,
        ``1`` positive / ``0`` negative; ``K`` = number of active nodes (may be 0).
    """
    _check_grid(grid)
    if status.shape != (grid * grid,):
        raise ValueError(
            f"status: expected shape ({grid * grid},) for grid {grid}, got {tuple(status.shape)}"
        )
    status = status.long()
    if status.numel() and (status.min() < 0 or status.max() > NEGATIVE):
        raise ValueError("status: expected values in {0, 1, 2} (inactive, positive, negative)")
    active = torch.nonzero(status != INACTIVE).reshape(-1)
    points = node_positions(grid, H, W, device=status.device)[active]
    labels = (status[active] == POSITIVE).long()
    return points, labels


def prompts_from_reference(
    ref_tokens: torch.Tensor,
    ref_mask: torch.Tensor | np.ndarray,
    tgt_tokens: torch.Tensor,
    grid: int,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One-shot feature-matching prompts on the ``G x G`` node grid from raw DINOv2 tokens.

    The one way the project turns a reference (image features + mask) into a target's prompts: both token
    grids are average-pooled to the node grid (:func:`ppd.env.graph.pool_tokens`), then matched by
    :func:`feature_matching_prompts`. Used by the evaluation harness and ``ppd.predict``.

    Args:
        ref_tokens: ``(Gr, Gr, C)`` reference DINOv2 tokens (any dtype).
        ref_mask: ``(H_r, W_r)`` bool reference mask.
        tgt_tokens: ``(Gt, Gt, C)`` target DINOv2 tokens.
        grid: node grid side ``G``.
        **options: :func:`feature_matching_prompts` keyword arguments.

    Returns:
        ``(status (G * G,), info)`` as :func:`feature_matching_prompts`.
    """
    return feature_matching_prompts(
        pool_tokens(ref_tokens.float(), grid), ref_mask, pool_tokens(tgt_tokens.float(), grid), **options
    )
