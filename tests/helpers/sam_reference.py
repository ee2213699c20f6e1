"""Compare the cached-image-side decoder with segment_anything's own ``MaskDecoder.forward``."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from ppd.models.sam import decode
from ppd.models.sam_cached import image_side_cache


def assert_cached_matches_reference(
    sam: Sam,
    b: int,
    n: int,
    multimask: bool,
    seed: int,
    embedding: torch.Tensor | None = None,
    atol: float = 1e-5,
) -> None:
    """One image, ``b`` prompt sets of ``n`` points: ``decode(..., image_cache=...)`` equals ``MaskDecoder``.

    ``MaskDecoder.forward`` takes one image embedding and ``b`` prompt sets (it repeats the embedding), so the
    reference runs on exactly segment_anything's code path. Low-res logits ``(b, M, 256, 256)`` and IoU
    predictions ``(b, M)`` must agree within ``atol``; the first set carries a padding point when ``n > 1``.
    """
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 256, 64, 64, generator=g) if embedding is None else embedding.float()
    pts = torch.rand(b, n, 2, generator=g) * 1000
    lab = torch.randint(0, 2, (b, n), generator=g)
    if n > 1:
        lab[0, -1] = -1
    with torch.no_grad():
        pe = sam.prompt_encoder
        sparse, dense = pe(points=(pts, lab), boxes=None, masks=None)
        ref_masks, ref_iou = sam.mask_decoder(
            emb, pe.get_dense_pe(), sparse, dense, multimask_output=multimask
        )
        cache = image_side_cache(sam.mask_decoder, pe, emb)
    masks, iou = decode(sam, None, pts, lab, multimask_output=multimask, image_cache=cache)
    m = 3 if multimask else 1
    assert masks.shape == ref_masks.shape == (b, m, 256, 256)
    assert iou.shape == ref_iou.shape == (b, m)
    err_m, err_i = (masks - ref_masks).abs().max().item(), (iou - ref_iou).abs().max().item()
    assert err_m <= atol, f"low-res logits differ by {err_m:.2e} (> {atol})"
    assert err_i <= atol, f"IoU predictions differ by {err_i:.2e} (> {atol})"
