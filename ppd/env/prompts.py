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

from ppd.env.graph import node_positions, pool_tokens
from ppd.types import INACTIVE, NEGATIVE, POSITIVE

Metric = Literal["l2", "cosine"]


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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One-shot prompts by nearest-neighbour matching of patch features (PPO-style).

    Every reference patch whose centre lies inside ``ref_mask`` (foreground) is matched to its nearest
    target patch, which becomes a positive candidate; every other reference patch (background) likewise
    gives a negative candidate. A target patch hit by both classes is a *conflict* and is dropped. When the
    reference mask covers no node centre (object smaller than a patch) the patches with the largest mask
    coverage are used as foreground (``info["ref_fg_fallback"]``).

    With ``bidirectional=True`` a match ``r -> t`` is kept only if it passes the cycle check: the reference
    patch nearest to ``t`` belongs to the same class as ``r``. (This is a class-level mutual-nearest-
    neighbour test; conflicts cannot survive it, so ``n_conflicts`` is then 0.)

    Caps keep, per class, the target patches with the smallest match distance (``cap="best"``, ties by node
    index, deterministic) or a random subset (``cap="random"``, uses ``generator``).

    Args:
        ref_tokens: ``(Gr, Gr, C)`` reference patch tokens.
        ref_mask: ``(H_r, W_r)`` bool reference mask.
        tgt_tokens: ``(G, G, C)`` target patch tokens.
        metric: ``"l2"`` (raw tokens) or ``"cosine"`` (``1 - cos``).
        bidirectional: apply the cycle check.
        max_pos: cap on positives; ``None`` = no cap.
        max_neg: cap on negatives; ``None`` = no cap.
        generator: CPU generator for ``cap="random"``; ``None`` = global RNG.
        cap: ``"best"`` or ``"random"``.

    Returns:
        ``status (G * G,)`` long and ``info`` with ints ``n_pos``, ``n_neg`` (after caps),
        ``n_pos_candidates``, ``n_neg_candidates`` (before caps), ``n_conflicts``, ``n_cycle_rejected``,
        ``n_ref_fg``, ``n_ref_bg`` and bools ``no_positive``, ``ref_fg_fallback``.
    """
    _check_cap(max_pos, "max_pos")
    _check_cap(max_neg, "max_neg")
    if cap not in ("best", "random"):
        raise ValueError(f"cap: expected 'best' or 'random', got {cap!r}")
    ref, g_ref = _flat_tokens(ref_tokens, "ref_tokens")
    tgt, g_tgt = _flat_tokens(tgt_tokens, "tgt_tokens")
    ref_mask_t = _as_mask(ref_mask, "ref_mask")
    ref_fg = mask_on_grid(ref_mask_t, g_ref).reshape(-1).to(ref.device)
    fallback = False
    if not ref_fg.any() and ref_mask_t.any():
        frac = mask_fraction_on_grid(ref_mask_t, g_ref).reshape(-1).to(ref.device)
        ref_fg = frac == frac.max()
        fallback = True

    dist = _cross_distances(ref, tgt, metric)  # (Nr, Nt)
    match_d, match_t = dist.min(dim=1)  # nearest target per reference patch (first index on ties)
    keep = torch.ones_like(ref_fg)
    n_cycle_rejected = 0
    if bidirectional:
        back_r = dist.argmin(dim=0)  # nearest reference patch per target patch
        keep = ref_fg[back_r[match_t]] == ref_fg
        n_cycle_rejected = int((~keep).sum())

    n_tgt = tgt.shape[0]
    inf = torch.full((n_tgt,), float("inf"), device=tgt.device)
    # Best (smallest) match distance per target patch and class; inf = not hit by that class.
    fg_sel, bg_sel = keep & ref_fg, keep & ~ref_fg
    fg_score = inf.clone().scatter_reduce_(0, match_t[fg_sel], match_d[fg_sel], reduce="amin")
    bg_score = inf.clone().scatter_reduce_(0, match_t[bg_sel], match_d[bg_sel], reduce="amin")
    fg_hit, bg_hit = torch.isfinite(fg_score), torch.isfinite(bg_score)
    conflict = fg_hit & bg_hit
    pos = torch.nonzero(fg_hit & ~conflict).reshape(-1)
    neg = torch.nonzero(bg_hit & ~conflict).reshape(-1)
    n_pos_cand, n_neg_cand = pos.numel(), neg.numel()
    if cap == "best":
        pos = _best_subset(pos, fg_score[pos], max_pos)
        neg = _best_subset(neg, bg_score[neg], max_neg)
    else:
        pos = _random_subset(pos, max_pos, generator)
        neg = _random_subset(neg, max_neg, generator)

    status = torch.zeros(n_tgt, dtype=torch.long, device=tgt.device)
    status[pos] = POSITIVE
    status[neg] = NEGATIVE
    info: dict[str, Any] = {
        "n_pos": int(pos.numel()),
        "n_neg": int(neg.numel()),
        "n_pos_candidates": n_pos_cand,
        "n_neg_candidates": n_neg_cand,
        "n_conflicts": int(conflict.sum()),
        "n_cycle_rejected": n_cycle_rejected,
        "n_ref_fg": int(ref_fg.sum()),
        "n_ref_bg": int((~ref_fg).sum()),
        "no_positive": pos.numel() == 0,
        "ref_fg_fallback": fallback,
        "grid": g_tgt,
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
