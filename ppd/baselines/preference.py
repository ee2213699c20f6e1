"""SAMPO's online prompt-centric preference mining (pure functions).

For one GT object, :func:`synthesize_prompt_sets` draws N prompt sets of varying quality; the model's
multimask output gives M = 3 masks per set; :func:`mask_iou` scores them against the GT; then

* :func:`mine_inter_prompt` (L_PO1): for each output slot j, winner = the prompt set whose slot-j mask has
  the highest IoU, loser = the lowest;
* :func:`mine_intra_prompt` (L_PO2): for each prompt set, winner / loser among its M masks.

A pair only counts (``valid``) when the winner's IoU is strictly higher than the loser's (ties carry no
preference).
"""

from __future__ import annotations

import torch

from ppd.data.points import NEGATIVE, POSITIVE, pad_prompt_sets, sample_points

__all__ = ["mask_iou", "mine_inter_prompt", "mine_intra_prompt", "synthesize_prompt_sets"]


def mask_iou(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of binary masks with a GT, over the valid pixels.

    Args:
        pred: ``(..., H, W)`` bool predicted masks.
        gt: ``(..., H, W)`` (or broadcastable) bool GT.
        valid: broadcastable pixels that count (``None`` = all).

    Returns:
        ``(...)`` IoU in [0, 1]; 1 when both masks are empty.
    """
    p, g = pred.bool(), gt.bool()
    if valid is not None:
        v = valid.bool()
        p, g = p & v, g & v
    inter = (p & g).sum(dim=(-2, -1)).float()
    union = (p | g).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def mine_inter_prompt(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inter-prompt pairs (L_PO1): per image and output slot, best vs worst prompt set.

    Args:
        iou: ``(B, N, M)`` IoU of mask slot m of prompt set n.

    Returns:
        ``winner`` ``(B, M)`` and ``loser`` ``(B, M)`` prompt-set indices, ``valid`` ``(B, M)`` bool
        (winner IoU > loser IoU). Ties resolve to the lowest index.
    """
    if iou.ndim != 3:
        raise ValueError(f"iou must be (B, N, M), got {tuple(iou.shape)}")
    w = iou.argmax(dim=1)
    lo = iou.argmin(dim=1)
    valid = iou.gather(1, w[:, None]).squeeze(1) > iou.gather(1, lo[:, None]).squeeze(1)
    return w, lo, valid


def mine_intra_prompt(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intra-prompt pairs (L_PO2): per image and prompt set, best vs worst of its M masks.

    Args:
        iou: ``(B, N, M)``.

    Returns:
        ``winner`` ``(B, N)`` and ``loser`` ``(B, N)`` slot indices, ``valid`` ``(B, N)`` bool.
    """
    if iou.ndim != 3:
        raise ValueError(f"iou must be (B, N, M), got {tuple(iou.shape)}")
    w = iou.argmax(dim=2)
    lo = iou.argmin(dim=2)
    valid = iou.gather(2, w[..., None]).squeeze(2) > iou.gather(2, lo[..., None]).squeeze(2)
    return w, lo, valid


def synthesize_prompt_sets(
    gt: torch.Tensor,
    n_sets: int,
    max_pos: int = 3,
    max_neg: int = 3,
    p_poor: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N random prompt sets of varying quality for one GT mask.

    Each set has ``U{1..max_pos}`` positive and ``U{0..max_neg}`` negative clicks drawn uniformly inside /
    outside the GT. With probability ``p_poor`` a set is deliberately poor: one of its clicks is moved to
    the wrong side of the boundary, keeping its label (a "positive" click on the background, or a
    "negative" click on the object).

    Args:
        gt: ``(H, W)`` bool mask (the frame the points are returned in).
        n_sets: N.
        max_pos: at most this many positive clicks per set (paper: 3).
        max_neg: at most this many negative clicks per set (paper: 3).
        p_poor: probability that a set is corrupted.
        generator: RNG.

    Returns:
        ``points`` ``(N, K, 2)`` float ``(x, y)`` pixels of ``gt`` and ``labels`` ``(N, K)`` (1 / 0 / -1
        padding), ``K <= max_pos + max_neg``.
    """
    if n_sets < 1:
        raise ValueError(f"n_sets must be >= 1, got {n_sets}")
    if max_pos < 1 or max_neg < 0:
        raise ValueError(f"need max_pos >= 1 and max_neg >= 0, got {max_pos}, {max_neg}")
    gt = gt.bool()
    sets = []
    for _ in range(n_sets):
        n_pos = int(torch.randint(1, max_pos + 1, (1,), generator=generator))
        n_neg = int(torch.randint(0, max_neg + 1, (1,), generator=generator))
        pts, lab = sample_points(gt, n_pos, n_neg, generator)
        if float(torch.rand((), generator=generator)) < p_poor:
            # move one click to the wrong side, keeping its label (the 3 + 3 limits hold): a "positive"
            # click on the background, or a "negative" click on the object
            has_neg = bool((lab == NEGATIVE).any())
            wrong_pos = not has_neg or bool(torch.rand((), generator=generator) < 0.5)
            label = POSITIVE if wrong_pos else NEGATIVE
            bad, _ = sample_points(~gt if wrong_pos else gt, 1, 0, generator)
            idx = torch.nonzero(lab == label).flatten()
            if len(bad) and len(idx):
                j = int(idx[torch.randint(0, len(idx), (1,), generator=generator)])
                pts[j] = bad[0]
        sets.append((pts, lab))
    return pad_prompt_sets(sets)
