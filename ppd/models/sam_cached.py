"""SAM's mask decoder with the prompt-independent image-side work cached per image (exact).

In ``MaskDecoder.predict_masks`` (no mask prompt) the image side of the two-way transformer's *first*
block only depends on the image embedding:

* ``src = embedding + no_mask_embed`` (the dense prompt embedding without a mask prompt is one learned
  vector added everywhere) and the dense positional encoding ``pe`` are prompt independent;
* token -> image cross attention of block 0: its keys ``k_proj(src + pe)`` and values ``v_proj(src)``;
* image -> token cross attention of block 0: its queries ``q_proj(src + pe)``.

From block 0's output on, the image tokens depend on the prompt tokens, so later blocks and the final
token -> image attention are computed per prompt set as usual. The three cached projections are
``3 x (4096 x 256 x 128)`` multiply-adds, ~0.8 of the decoder's ~3.6 GFLOP, plus the flatten/permute/add
copies of the image embedding and the positional encoding.

:func:`image_side_cache` builds the cache for B embeddings, :func:`predict_masks_cached` is
``MaskDecoder.predict_masks`` (all mask outputs, paired prompt set i <-> cache row i) on it. It reuses the
decoder's own sub-modules and weights; ``tests/unit/test_sam_cached.py`` checks it against
``segment_anything``'s ``MaskDecoder`` (low-res logits and IoU predictions within 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor


@dataclass
class ImageSideCache:
    """Prompt-independent inputs of the decoder's first transformer block for B images.

    Attributes:
        keys: ``(B, HW, C)`` image tokens ``embedding + no_mask_embed`` (C = 256, HW = 64 * 64).
        pe: ``(1, HW, C)`` dense positional encoding (the same for every image).
        k_t2i: ``(B, HW, Ci)`` keys of block 0's token -> image attention (Ci = C / downsample = 128).
        v_t2i: ``(B, HW, Ci)`` values of block 0's token -> image attention.
        q_i2t: ``(B, HW, Ci)`` queries of block 0's image -> token attention.
        size: ``(h, w)`` of the embedding grid (64, 64).
    """

    keys: Tensor
    pe: Tensor
    k_t2i: Tensor
    v_t2i: Tensor
    q_i2t: Tensor
    size: tuple[int, int]

    @property
    def batch(self) -> int:
        """Number of images B."""
        return int(self.keys.shape[0])

    def nbytes(self) -> int:
        """Bytes held per image (``pe`` is shared and not counted)."""
        return sum(t[0].numel() * t.element_size() for t in (self.keys, self.k_t2i, self.v_t2i, self.q_i2t))

    def rows(self, index: Tensor | list[int]) -> ImageSideCache:
        """The cache of a subset / re-ordering of the images (``index`` of length B')."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.keys.device)
        return ImageSideCache(
            self.keys[idx], self.pe, self.k_t2i[idx], self.v_t2i[idx], self.q_i2t[idx], self.size
        )

    @staticmethod
    def cat(caches: list[ImageSideCache]) -> ImageSideCache:
        """Concatenate the caches of several images along the batch (all must share ``pe``)."""
        if len(caches) == 1:
            return caches[0]
        first = caches[0]
        return ImageSideCache(
            torch.cat([c.keys for c in caches]),
            first.pe,
            torch.cat([c.k_t2i for c in caches]),
            torch.cat([c.v_t2i for c in caches]),
            torch.cat([c.q_i2t for c in caches]),
            first.size,
        )

    def expand(self, b: int) -> ImageSideCache:
        """Broadcast a one-image cache to ``b`` prompt sets (views, no copy)."""
        if self.batch == b:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot broadcast a cache of {self.batch} images to {b} prompt sets")
        return ImageSideCache(
            self.keys.expand(b, -1, -1),
            self.pe,
            self.k_t2i.expand(b, -1, -1),
            self.v_t2i.expand(b, -1, -1),
            self.q_i2t.expand(b, -1, -1),
            self.size,
        )


def _first_block(decoder: MaskDecoder) -> TwoWayAttentionBlock:
    layers = decoder.transformer.layers
    if len(layers) == 0 or not layers[0].skip_first_layer_pe:
        raise ValueError("expected SAM's TwoWayTransformer (first block with skip_first_layer_pe=True)")
    return layers[0]


def image_side_cache(
    decoder: MaskDecoder, prompt_encoder: PromptEncoder, embeddings: Tensor
) -> ImageSideCache:
    """Compute the prompt-independent image-side tensors of the decoder for B image embeddings.

    Args:
        decoder: SAM's mask decoder.
        prompt_encoder: SAM's prompt encoder (for ``no_mask_embed`` and the dense positional encoding).
        embeddings: ``(B, C, h, w)`` image embeddings (``(B, 256, 64, 64)`` for SAM).

    Returns:
        The :class:`ImageSideCache` (same device and dtype as the decoder's weights).
    """
    if embeddings.ndim != 4:
        raise ValueError(f"embeddings must be (B, C, h, w), got {tuple(embeddings.shape)}")
    block = _first_block(decoder)
    b, c, h, w = embeddings.shape
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    keys = (embeddings + dense).flatten(2).permute(0, 2, 1)
    pe = prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    k = keys + pe
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    return ImageSideCache(
        keys=keys.contiguous(),
        pe=pe.contiguous(),
        k_t2i=t2i.k_proj(k),
        v_t2i=t2i.v_proj(keys),
        q_i2t=i2t.q_proj(k),
        size=(h, w),
    )


def _attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``Attention.forward`` on already projected ``q (B, Nq, Ci)``, ``k, v (B, Nk, Ci)`` -> ``(B, Nq, C)``."""
    q, k, v = (attn._separate_heads(t, attn.num_heads) for t in (q, k, v))
    c_per_head = q.shape[-1]
    a = q @ k.permute(0, 1, 3, 2)
    a = a / math.sqrt(c_per_head)
    a = torch.softmax(a, dim=-1)
    return attn.out_proj(attn._recombine_heads(a @ v))


def _first_block_cached(
    block: TwoWayAttentionBlock, tokens: Tensor, cache: ImageSideCache
) -> tuple[Tensor, Tensor]:
    """``TwoWayAttentionBlock.forward`` of block 0 (``skip_first_layer_pe``) with the cached image side.

    Args:
        block: the first block.
        tokens: ``(B, T, C)`` output + sparse prompt tokens (they are also the query PE).
        cache: the image-side cache, B rows.

    Returns:
        ``queries (B, T, C)`` and ``keys (B, HW, C)`` after the block.
    """
    queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
    t2i = block.cross_attn_token_to_image
    queries = block.norm2(queries + _attend(t2i, t2i.q_proj(queries + tokens), cache.k_t2i, cache.v_t2i))
    queries = block.norm3(queries + block.mlp(queries))
    i2t = block.cross_attn_image_to_token
    attn_out = _attend(i2t, cache.q_i2t, i2t.k_proj(queries + tokens), i2t.v_proj(queries))
    keys = block.norm4(cache.keys + attn_out)
    return queries, keys


def predict_masks_cached(
    decoder: MaskDecoder, cache: ImageSideCache, sparse: Tensor
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` without a mask prompt, on the cached image side.

    Args:
        decoder: SAM's mask decoder (the one the cache was built with).
        cache: :func:`image_side_cache` of B images, or of one image shared by all prompt sets.
        sparse: ``(B, T, C)`` sparse prompt embeddings (prompt encoder output); prompt set i is paired with
            cache row i.

    Returns:
        All ``num_mask_tokens`` masks ``(B, M, 4h, 4w)`` (low-res logits) and IoU predictions ``(B, M)``.
    """
    b = sparse.shape[0]
    cache = cache.expand(b)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    transformer = decoder.transformer
    queries, keys = _first_block_cached(transformer.layers[0], tokens, cache)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=cache.pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + cache.pe, v=keys)
    hs = transformer.norm_final_attn(queries + attn_out)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    h, w = cache.size
    src = keys.transpose(1, 2).reshape(b, -1, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, uh * uw)).view(b, -1, uh, uw)
    return masks, decoder.iou_prediction_head(iou_token_out)
