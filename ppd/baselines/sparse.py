"""SAM prediction from seeded sparse GT clicks (the "3 positive + 3 negative points" rows).

Shared by SAMPO's validation and the evaluation methods ``sam_sparse`` / ``sampo`` / ``sam_finetuned_sup``
so that every row sees exactly the same clicks for a given generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ppd.data.points import sample_points
from ppd.models.sam import decode, to_input_frame, upscale_logits

__all__ = ["SparsePrediction", "predict_sparse"]


@dataclass
class SparsePrediction:
    """Result of :func:`predict_sparse`.

    Attributes:
        mask: ``(H, W)`` bool prediction at original resolution.
        points: ``(K, 2)`` ``(x, y)`` clicks in original pixels.
        labels: ``(K,)`` 1 positive / 0 negative.
        slot: which output mask was kept (0 = single-mask output, 1..3 = multimask slots).
    """

    mask: np.ndarray
    points: torch.Tensor
    labels: torch.Tensor
    slot: int


@torch.no_grad()
def predict_sparse(
    sam: nn.Module,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    gt: np.ndarray | torch.Tensor,
    generator: torch.Generator | None,
    n_pos: int = 3,
    n_neg: int = 3,
    multimask: bool = True,
) -> SparsePrediction:
    """Seeded GT clicks -> SAM mask.

    Args:
        sam: SAM (plain or LoRA-merged).
        embedding: ``(256, 64, 64)`` image embedding.
        input_size: ``(h, w)`` in SAM's 1024 frame.
        original_size: ``(H, W)``.
        gt: ``(H, W)`` bool ground truth the clicks are drawn from.
        generator: RNG of the clicks.
        n_pos: positive clicks (inside the GT).
        n_neg: negative clicks (outside the GT).
        multimask: use SAM's 3 multimask outputs and keep the one with the highest predicted IoU
            (the slots SAMPO fine-tunes); ``False`` = SAM's single-mask output.

    Returns:
        The :class:`SparsePrediction`.
    """
    pts, labels = sample_points(gt, n_pos, n_neg, generator)
    if len(pts) == 0:
        raise ValueError("no clicks could be drawn (empty image?)")
    pts_in = to_input_frame(pts, original_size)[None]
    logits, iou = decode(sam, embedding[None], pts_in, labels[None], multimask_output=multimask)
    slot = int(iou[0].argmax()) if multimask else 0
    up = upscale_logits(logits[:, slot : slot + 1].float(), input_size, original_size)
    return SparsePrediction((up[0, 0] > 0).cpu().numpy(), pts, labels, slot + 1 if multimask else 0)
