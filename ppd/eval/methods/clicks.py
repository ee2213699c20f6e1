"""One-click rows: one positive click at the most interior GT pixel, SAM's single mask or best of three.

The click is the maximum of the Euclidean distance transform of the GT (image border counted as
background, first maximum in row-major order), not snapped to the node grid. ``one_click`` takes SAM's
single-mask output, ``one_click_multimask`` the best of its 3 masks by *predicted* IoU (which on endoscopy
images often picks the whole field of view).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppd.eval.registry import MethodContext, MethodOutput, register_method


def _min_plus_last_dim(f: torch.Tensor) -> torch.Tensor:
    """``out[..., i] = min_j f[..., j] + (i - j)^2`` (exact 1-D squared distance transform), in chunks."""
    n = f.shape[-1]
    idx = torch.arange(n, dtype=f.dtype)
    sq = (idx[:, None] - idx[None, :]) ** 2  # (n_i, n_j)
    out = torch.empty_like(f)
    chunk = max(1, (1 << 24) // (n * n))
    for s in range(0, f.shape[0], chunk):
        out[s : s + chunk] = (f[s : s + chunk, None, :] + sq[None]).amin(-1)
    return out


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each foreground pixel to the nearest background pixel.

    Pixels outside the image count as background. Separable exact EDT (a column pass then a row pass of
    the 1-D squared-distance transform, each an explicit min over all positions, done in torch chunks):
    hand-rolled because neither scipy nor OpenCV is a dependency. Cost ``O(H W (H + W))``, ~1 s for a
    768 x 576 image.

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` float32 distances (0 on background).
    """
    m = torch.from_numpy(np.pad(np.asarray(mask, dtype=bool), 1))
    dtype = torch.float32 if sum(m.shape) < 4000 else torch.float64  # exact integer squares
    big = float(sum(m.shape) ** 2)
    f = torch.where(m, torch.tensor(big, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    f = _min_plus_last_dim(f.T.contiguous()).T  # along columns
    f = _min_plus_last_dim(f.contiguous())  # along rows
    return f.sqrt()[1:-1, 1:-1].float().numpy()


def most_interior_point(mask: np.ndarray) -> tuple[float, float] | None:
    """Pixel centre ``(x + 0.5, y + 0.5)`` of the maximum of :func:`distance_transform` (None if empty).

    Ties: the first maximum in row-major order.
    """
    if not np.asarray(mask).any():
        return None
    d = distance_transform(mask)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x) + 0.5, float(y) + 0.5


def _one_click(ctx: MethodContext, stem: str, multimask: bool) -> MethodOutput:
    from ppd.models.sam import decode, to_input_frame, upscale_logits

    f = ctx.features(stem)
    pt = most_interior_point(ctx.gt_mask(stem))
    if pt is None:
        return MethodOutput(mask=np.zeros(f.original_size, dtype=bool), extra={"click": None})
    pts = to_input_frame(torch.tensor([[pt]], dtype=torch.float32), f.original_size)
    with torch.inference_mode():
        logits, iou = decode(
            ctx.sam,
            f.sam_embedding.float()[None],
            pts,
            torch.ones(1, 1, dtype=torch.long),
            multimask_output=multimask,
        )
    k = int(iou[0].argmax()) if multimask else 0
    up = upscale_logits(logits[:, k : k + 1].float(), f.input_size, f.original_size)
    extra: dict[str, Any] = {"click": list(pt), "mask_index": k}
    return MethodOutput(mask=(up[0, 0] > 0).numpy(), extra=extra)


@register_method("one_click", output="mask")
def one_click(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """One positive click at the most interior GT pixel, SAM's single-mask output."""
    return {s: _one_click(ctx, s, multimask=False) for s in stems}


@register_method("one_click_multimask", output="mask")
def one_click_multimask(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """One positive click at the most interior GT pixel, best of SAM's 3 masks by predicted IoU."""
    return {s: _one_click(ctx, s, multimask=True) for s in stems}
