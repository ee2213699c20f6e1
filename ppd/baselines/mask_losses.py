"""Pure loss functions on SAM mask logits (SAMPO, Proxy Prompt and supervised fine-tuning).

Every function takes logits of shape ``(B, ..., H, W)`` (any number of leading dimensions) and binary
targets of the same shape; ``valid`` (same shape, or broadcastable) marks the pixels that count (e.g. the
part of SAM's 256x256 low-res frame that covers the image, without the padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bce_loss", "dice_loss", "dpo_loss", "mask_log_likelihood"]


def _valid(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(like)
    return valid.to(like.dtype).expand_as(like)


def mask_log_likelihood(
    logits: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-pixel Bernoulli log-likelihood ``log pi(y | S)`` of a binary mask under mask logits.

    ``log pi(y) = sum_p valid_p * [y_p log sigmoid(z_p) + (1 - y_p) log sigmoid(-z_p)]``, summed
    (``reduction="sum"``) or averaged over the valid pixels (``"mean"``) of each mask.

    Args:
        logits: ``(..., H, W)`` mask logits ``z``.
        y: ``(..., H, W)`` binary mask (bool or {0, 1} float); no gradient flows into it.
        valid: ``(..., H, W)`` (or broadcastable) pixels that count; ``None`` = all.
        reduction: ``"mean"`` or ``"sum"`` over the pixels of each mask.

    Returns:
        ``(...)`` log-likelihood per mask (<= 0).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape != y.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and y {tuple(y.shape)} differ in shape")
    y = y.detach().to(logits.dtype)
    ll = y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits)
    v = _valid(valid, ll)
    total = (ll * v).sum(dim=(-2, -1))
    if reduction == "sum":
        return total
    return total / v.sum(dim=(-2, -1)).clamp_min(1.0)


def dpo_loss(
    pi_w: torch.Tensor,
    ref_w: torch.Tensor,
    pi_l: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct Preference Optimisation loss, averaged over preference pairs.

    ``-log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])`` with ``pi_*``/``ref_*`` the log-likelihoods
    of the winner ``w`` and loser ``l`` under the trained and the frozen reference policy.

    Args:
        pi_w: ``(P,)`` log pi_theta(y_w | S_w).
        ref_w: ``(P,)`` log pi_ref(y_w | S_w) (treated as a constant).
        pi_l: ``(P,)`` log pi_theta(y_l | S_l).
        ref_l: ``(P,)`` log pi_ref(y_l | S_l) (treated as a constant).
        beta: inverse temperature.
        weight: ``(P,)`` optional 0/1 (or real) pair weights; the loss is the weighted mean. With all
            weights 0 the loss is 0 (with a graph, so ``backward`` still works).

    Returns:
        Scalar loss.
    """
    margin = beta * ((pi_w - ref_w.detach()) - (pi_l - ref_l.detach()))
    per_pair = -F.logsigmoid(margin)
    if weight is None:
        return per_pair.mean()
    w = weight.to(per_pair.dtype)
    return (per_pair * w).sum() / w.sum().clamp_min(1.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the valid pixels of all masks.

    Args:
        logits: ``(..., H, W)`` mask logits.
        target: ``(..., H, W)`` binary target (bool or float in [0, 1]).
        valid: ``(..., H, W)`` (or broadcastable) pixels that count; ``None`` = all.

    Returns:
        Scalar loss.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    per_px = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    v = _valid(valid, per_px)
    return (per_px * v).sum() / v.sum().clamp_min(1.0)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` on ``p = sigmoid(logits)``.

    Computed per mask (over its last two dimensions) and averaged over masks.

    Args:
        logits: ``(..., H, W)`` mask logits.
        target: ``(..., H, W)`` binary target.
        valid: ``(..., H, W)`` (or broadcastable) pixels that count; ``None`` = all.
        eps: smoothing constant (keeps an empty target with an empty prediction at loss 0).

    Returns:
        Scalar loss.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    p = torch.sigmoid(logits)
    t = target.to(p.dtype)
    v = _valid(valid, p)
    p, t = p * v, t * v
    inter = (p * t).sum(dim=(-2, -1))
    denom = p.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1))
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()
