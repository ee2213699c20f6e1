"""How SAM's prediction is scored: Dice against the GT (the reward) and the per-node SAM inputs.

Pure functions on low-res logits / masks, used by :class:`~ppd.env.prompt_env.PromptEnv` (which re-exports
them), the counterfactual tables and the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SAM_NODE_FEATURES", "dice_score", "sam_node_features"]

#: names of the per-node inputs taken from SAM's current prediction (``sam_inputs`` observations)
SAM_NODE_FEATURES: tuple[str, ...] = ("prob_patch", "prob_neighbourhood", "mask_area")


def dice_score(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice of boolean masks with the project's corner-case rule.

    Hand-written instead of ``torchmetrics`` because it sits on the RL hot path (one call per step) and
    must return Dice 1 for an empty GT with an empty prediction; ``tests/unit/test_env.py`` checks it
    against ``torchmetrics`` on non-empty cases.

    Args:
        pred: ``(B, h, w)`` bool.
        gt: ``(B, h, w)`` bool.

    Returns:
        ``(B,)`` float32 Dice.
    """
    p = pred.flatten(1).float()
    g = gt.flatten(1).float()
    inter = (p * g).sum(1)
    denom = p.sum(1) + g.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


def sam_node_features(logits: torch.Tensor, valid_size: tuple[int, int], grid: int) -> torch.Tensor:
    """Per-node inputs from SAM's current prediction of one or more states of ONE image.

    What SAM predicts *now* is what a removal changes, so the defender sees it (issue 23): the mean
    foreground probability over each node's patch, the same averaged over the 3 x 3 patch neighbourhood,
    and the predicted mask's area fraction (the same value at every node). All in ``[0, 1]``; a state
    with no active prompt (logits ``-inf``) gives zeros.

    Args:
        logits: ``(B, 256, 256)`` low-res logits (SAM's padded frame).
        valid_size: ``(h4, w4)`` valid region of the low-res frame (:func:`ppd.models.sam.low_res_valid_size`).
        grid: node grid side ``G``.

    Returns:
        ``(B, G * G, 3)`` float32, in the order of :data:`SAM_NODE_FEATURES`.
    """
    h4, w4 = valid_size
    prob = torch.sigmoid(logits[:, None, :h4, :w4].float())  # sigmoid(-inf) = 0
    patch = F.adaptive_avg_pool2d(prob, grid)  # (B, 1, G, G)
    nbhd = F.avg_pool2d(patch, 3, stride=1, padding=1, count_include_pad=False)
    area = (prob > 0.5).float().mean((1, 2, 3))  # (B,)
    b = logits.shape[0]
    return torch.stack(
        [patch.reshape(b, -1), nbhd.reshape(b, -1), area[:, None].expand(b, grid * grid)], dim=-1
    )
