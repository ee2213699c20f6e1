"""Proxy Prompt Generator (PPG): support (image, mask) pairs -> sparse prompt embeddings for SAM's decoder.

Re-implementation of the prompt generator of "Proxy Prompt: Endowing SAM & SAM 2 with
Auto-Interactive-Prompt for Medical Segmentation" (arXiv 2502.03501) from its description (no public code).

Blocks (all plain ``nn.Module``s, independent of the SAM version: they see image features and emit prompt
tokens; :func:`decode_sparse` is the only SAM-specific piece):

* :class:`ContextualEncoder` -- encodes each support image concatenated with its (union) mask.
  ``backbone="sam"`` (default) reuses the *cached* SAM embedding of the support image ``(256, 64, 64)``
  concatenated with the mask at 64x64 (cheap: no extra image encoder); any other name builds a timm
  backbone (``timm.create_model(name, pretrained=False, in_chans=4, features_only=True)``) over the raw
  support pixels + mask (the paper uses Vision Mamba; its ablation has ViT / ResNet-50 close behind).
* :class:`BridgeUnit` -- support feature duplicated per object, concatenated with the object's mask feature
  along channels, :class:`CBAM`, two :class:`ResBlock`s, flattened to tokens.
* :func:`selective_map` -- ``softmax(F_t F_s^T / sqrt(C))`` over the support patches; applied to the
  aggregated support tokens it gives the contextual embedding of each target patch.
* :class:`ContextualColorization` (CCM) -- ``depth`` (4) identical :class:`CCMBlock`s of bidirectional
  cross-attention + FFN between target tokens and ``T`` context tokens; the final context tokens,
  projected to the decoder width, are the sparse prompt embeddings ``(B, O, T, 256)``.

Deviation from the paper (documented in docs/proxy_prompt.md): the per-patch contextual embedding
``(Nt, C)`` is pooled into ``T`` context tokens by ``T`` learned queries (attention pooling) before the
CCM, so SAM's decoder receives a handful of prompt tokens, as it does for points/boxes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ImageNet statistics, for the timm backbone's pixel input
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass
class ProxyPromptConfig:
    """Hyper-parameters of the generator (stored in checkpoints).

    Attributes:
        backbone: contextual encoder: ``"sam"`` (cached SAM embedding + mask) or a timm model name
            (raw support pixels + mask, ``in_chans=4``, random init: no pretrained weights are fetched).
        feature_dim: channels ``Cf`` of the image features (SAM: 256).
        dim: internal width ``C``.
        grid: side of the token grid target and support features are pooled to (``Nt = Ns = grid**2``).
        mask_dim: channels of the per-object mask feature in the Bridge Unit.
        num_tokens: ``T`` prompt tokens per object.
        depth: CCM blocks (paper: 4).
        heads: attention heads.
        mlp_ratio: FFN width / ``C``.
        prompt_dim: width of the decoder's prompt tokens (SAM: 256).
        support_size: side of the raw support image for the timm backbone.
        timm_out_index: which ``features_only`` stage of the timm backbone to use (``-1`` = last).
    """

    backbone: str = "sam"
    feature_dim: int = 256
    dim: int = 128
    grid: int = 16
    mask_dim: int = 32
    num_tokens: int = 4
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    prompt_dim: int = 256
    support_size: int = 256
    timm_out_index: int = -1


@dataclass
class ProxyPromptOutput:
    """Everything the generator computes for a batch.

    Attributes:
        prompts: ``(B, O, T, prompt_dim)`` sparse prompt embeddings.
        selective_map: ``(B, O, Nt, K*Ns)`` row-stochastic attention of target over support patches.
        context: ``(B, O, Nt, C)`` contextual embedding (selective map applied to the support tokens).
    """

    prompts: torch.Tensor
    selective_map: torch.Tensor
    context: torch.Tensor


# ------------------------------------------------------------------------------------------ small blocks
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): channel then spatial attention.

    Args:
        channels: input channels ``C``.
        reduction: channel-MLP reduction ratio.
        kernel_size: spatial-attention convolution size.
    """

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``."""
        ca = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        x = x * ca[:, :, None, None]
        sa = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x * sa


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm + ReLU and a (projected) skip connection.

    Args:
        in_ch: input channels.
        out_ch: output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        groups = math.gcd(8, out_ch)
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_ch),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_ch, H, W)`` -> ``(N, out_ch, H, W)``."""
        return F.relu(self.body(x) + self.skip(x))


class FFN(nn.Module):
    """Pre-norm MLP residual branch: ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, C)`` -> ``(N, L, C)``."""
        return x + self.net(x)


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention ``x + MHA(LN(x), LN(ctx), LN(ctx))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """``x (N, L, C)`` attends to ``ctx (N, M, C)``; returns ``(N, L, C)``."""
        kv = self.norm_kv(ctx)
        out, _ = self.attn(self.norm_q(x), kv, kv, need_weights=False)
        return x + out


# ------------------------------------------------------------------------------------ selection steps
def _masks_to_grid(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., H, W)`` masks (bool/float) -> ``(..., size, size)`` area fractions in ``[0, 1]``."""
    lead = masks.shape[:-2]
    m = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.adaptive_avg_pool2d(m, size).reshape(*lead, size, size)


class ContextualEncoder(nn.Module):
    """Step 1 of the CSM: features of each support image concatenated with its mask.

    Args:
        config: generator config (``backbone``, ``feature_dim``, ``dim``, ``grid``...).
    """

    def __init__(self, config: ProxyPromptConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.backbone == "sam":
            self.backbone: nn.Module | None = None
            in_ch = c.feature_dim + 1
        else:
            import timm

            self.backbone = timm.create_model(
                c.backbone, pretrained=False, in_chans=4, features_only=True, out_indices=(c.timm_out_index,)
            )
            in_ch = int(self.backbone.feature_info.channels()[-1])
            self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Sequential(
            nn.Conv2d(in_ch, c.dim, 1), nn.GroupNorm(math.gcd(8, c.dim), c.dim), nn.GELU()
        )

    def forward(self, support: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode support images with their masks.

        Args:
            support: ``(N, Cf, h, w)`` cached image features (``backbone="sam"``) or ``(N, 3, H, W)``
                uint8/float RGB pixels in ``[0, 255]`` (timm backbone; resized to ``support_size``).
            mask: ``(N, Hm, Wm)`` union object mask of each support image (bool or float in ``[0, 1]``).

        Returns:
            ``(N, C, grid, grid)`` support features.
        """
        c = self.config
        if self.backbone is None:
            if support.shape[1] != c.feature_dim:
                raise ValueError(f"support features must have {c.feature_dim} channels, got {support.shape}")
            m = _masks_to_grid(mask, support.shape[-1])[:, None].to(support.dtype)
            x = torch.cat([support.float(), m.float()], 1)
        else:
            if support.shape[1] != 3:
                raise ValueError(
                    f"timm backbone {c.backbone!r} needs (N, 3, H, W) pixels, got {support.shape}"
                )
            s = c.support_size
            img = F.interpolate(support.float() / 255.0, (s, s), mode="bilinear", align_corners=False)
            img = (img - self.mean) / self.std
            m = F.interpolate(mask[:, None].float(), (s, s), mode="bilinear", align_corners=False)
            x = self.backbone(torch.cat([img, m * 2.0 - 1.0], 1))[-1]
        # pool first: the 1x1 projection then runs on grid x grid positions only (cheap on CPU)
        return self.proj(F.adaptive_avg_pool2d(x, c.grid))


class BridgeUnit(nn.Module):
    """Step 2 of the CSM: per-object support features refined with the object's mask.

    The support feature is duplicated per object and concatenated with that object's mask feature along
    channels; a CBAM block over the concatenated channels and two ResBlocks follow; the result is flattened
    to tokens.

    Args:
        dim: support feature channels ``C`` (also the output width).
        mask_dim: mask-feature channels.
    """

    def __init__(self, dim: int, mask_dim: int) -> None:
        super().__init__()
        self.mask_embed = nn.Sequential(nn.Conv2d(1, mask_dim, 3, padding=1), nn.GELU())
        self.cbam = CBAM(dim + mask_dim)
        self.res1 = ResBlock(dim + mask_dim, dim)
        self.res2 = ResBlock(dim, dim)

    def forward(self, feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refine support features per object.

        Args:
            feat: ``(N, C, g, g)`` support features (N = B*K).
            masks: ``(N, O, g, g)`` per-object masks at the feature grid (float in ``[0, 1]``).

        Returns:
            ``(N, O, g*g, C)`` support tokens per object.
        """
        n, c, g, _ = feat.shape
        o = masks.shape[1]
        m = self.mask_embed(masks.reshape(n * o, 1, g, g).to(feat.dtype))
        x = torch.cat([feat.unsqueeze(1).expand(n, o, c, g, g).reshape(n * o, c, g, g), m], 1)
        x = self.res2(self.res1(self.cbam(x)))
        return x.flatten(2).transpose(1, 2).reshape(n, o, g * g, c)


def selective_map(target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Step 3 of the CSM: ``softmax(F_t F_s^T / sqrt(C))`` over the support patches.

    Args:
        target: ``(..., Nt, C)`` target tokens.
        support: ``(..., Ns, C)`` support tokens.

    Returns:
        ``(..., Nt, Ns)``; every row sums to 1.
    """
    scale = 1.0 / math.sqrt(target.shape[-1])
    return torch.softmax(target @ support.transpose(-1, -2) * scale, dim=-1)


class CCMBlock(nn.Module):
    """One block of the Contextual Colorization Module.

    Target tokens are updated with cross-attention to the context + FFN; then the context is updated with
    a reversed cross-attention to the updated target + FFN.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.proj_t = nn.Linear(dim, dim)
        self.proj_c = nn.Linear(dim, dim)
        self.t_from_c = CrossAttention(dim, heads)
        self.ffn_t = FFN(dim, mlp_ratio)
        self.c_from_t = CrossAttention(dim, heads)
        self.ffn_c = FFN(dim, mlp_ratio)

    def forward(
        self, target: torch.Tensor, context: torch.Tensor, target_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``target (N, Nt, C)``, ``context (N, T, C)``, ``target_pos (N or 1, Nt, C)`` -> updated pair."""
        t = self.proj_t(target)
        c = self.proj_c(context)
        t = self.ffn_t(self.t_from_c(t + target_pos, c) - target_pos)
        c = self.ffn_c(self.c_from_t(c, t + target_pos))
        return t, c


class ContextualColorization(nn.Module):
    """CCM: ``depth`` identical :class:`CCMBlock`s; returns the final ``(target, context)`` tokens."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CCMBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def forward(
        self, target: torch.Tensor, context: torch.Tensor, target_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``target (N, Nt, C)``, ``context (N, T, C)`` -> same shapes."""
        for blk in self.blocks:
            target, context = blk(target, context, target_pos)
        return target, context


# ------------------------------------------------------------------------------------------ generator
class ProxyPromptGenerator(nn.Module):
    """Proxy Prompt Generator: CSM (contextual encoder, Bridge Unit, selective map) + CCM.

    Args:
        config: :class:`ProxyPromptConfig` (or ``None`` for the defaults); keyword overrides allowed.
    """

    def __init__(self, config: ProxyPromptConfig | None = None, **overrides: object) -> None:
        super().__init__()
        cfg = ProxyPromptConfig(**{**(asdict(config) if config else {}), **overrides})
        self.config = cfg
        c = cfg.dim
        self.encoder = ContextualEncoder(cfg)
        self.bridge = BridgeUnit(c, cfg.mask_dim)
        self.target_proj = nn.Sequential(nn.Conv2d(cfg.feature_dim, c, 1), nn.GroupNorm(math.gcd(8, c), c))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, c) * 0.02)
        self.pe_proj = nn.Linear(cfg.prompt_dim, c)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_tokens, c) * 0.02)
        self.pool = CrossAttention(c, cfg.heads)
        self.ccm = ContextualColorization(c, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.out = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, cfg.prompt_dim))

    def config_dict(self) -> dict[str, object]:
        """Plain-type config (for checkpoints)."""
        return asdict(self.config)

    def encode_target(
        self, target: torch.Tensor, image_pe: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens and their positional term.

        Args:
            target: ``(B, Cf, H, W)`` target image features.
            image_pe: optional ``(1, prompt_dim, H', W')`` positional encoding of the decoder's image frame
                (SAM: ``prompt_encoder.get_dense_pe()``); pooled to the grid and projected. Gives the prompt
                tokens the coordinates the decoder matches them against.

        Returns:
            ``(B, Nt, C)`` tokens and ``(1, Nt, C)`` positional term.
        """
        g = self.config.grid
        t = self.target_proj(F.adaptive_avg_pool2d(target.float(), g)).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if image_pe is not None:
            pe = F.adaptive_avg_pool2d(image_pe.float(), g).flatten(2).transpose(1, 2)
            pos = pos + self.pe_proj(pe[:1])
        return t, pos

    def forward(
        self,
        target: torch.Tensor,
        support: torch.Tensor,
        support_masks: torch.Tensor,
        image_pe: torch.Tensor | None = None,
    ) -> ProxyPromptOutput:
        """Generate prompt tokens for every (target, object) pair.

        Args:
            target: ``(B, Cf, H, W)`` target image features (SAM: ``(B, 256, 64, 64)``).
            support: ``(B, K, Cf, H, W)`` support features (``backbone="sam"``) or ``(B, K, 3, Hi, Wi)``
                support pixels (timm backbone).
            support_masks: ``(B, K, O, Hm, Wm)`` per-object support masks (bool or float), any resolution.
            image_pe: optional ``(1, prompt_dim, H', W')`` decoder positional encoding (see
                :meth:`encode_target`).

        Returns:
            :class:`ProxyPromptOutput` with ``prompts (B, O, T, prompt_dim)``.
        """
        if target.ndim != 4 or support.ndim != 5 or support_masks.ndim != 5:
            raise ValueError(
                "expected target (B, Cf, H, W), support (B, K, C, H, W), support_masks (B, K, O, Hm, Wm); got "
                f"{tuple(target.shape)}, {tuple(support.shape)}, {tuple(support_masks.shape)}"
            )
        b, k = support.shape[:2]
        o = support_masks.shape[2]
        if target.shape[0] != b or support_masks.shape[:2] != (b, k):
            raise ValueError(
                f"batch/support sizes differ: target {tuple(target.shape)}, support {tuple(support.shape)}, "
                f"masks {tuple(support_masks.shape)}"
            )
        cfg = self.config
        g, c = cfg.grid, cfg.dim
        masks = support_masks.float()
        feat = self.encoder(support.flatten(0, 1), masks.amax(2).flatten(0, 1))  # (B*K, C, g, g)
        grid_masks = _masks_to_grid(masks, g).flatten(0, 1)  # (B*K, O, g, g)
        s_tok = self.bridge(feat, grid_masks)  # (B*K, O, g*g, C)
        s_tok = s_tok.reshape(b, k, o, g * g, c).permute(0, 2, 1, 3, 4).reshape(b, o, k * g * g, c)
        t_tok, pos = self.encode_target(target, image_pe)  # (B, Nt, C), (1, Nt, C)
        t_obj = t_tok.unsqueeze(1).expand(b, o, g * g, c)
        smap = selective_map(t_obj, s_tok)  # (B, O, Nt, K*Ns)
        context = smap @ s_tok  # (B, O, Nt, C)
        # T context tokens: learned queries pool the per-patch contextual embedding (+ target position)
        ctx_flat = (context + pos.unsqueeze(1)).reshape(b * o, g * g, c)
        tokens = self.pool(self.queries.expand(b * o, -1, -1), ctx_flat)
        t_flat = t_obj.reshape(b * o, g * g, c) + context.reshape(b * o, g * g, c)
        _, tokens = self.ccm(t_flat, tokens, pos)
        prompts = self.out(tokens).reshape(b, o, cfg.num_tokens, cfg.prompt_dim)
        return ProxyPromptOutput(prompts=prompts, selective_map=smap, context=context)


# ------------------------------------------------------------------------------------- SAM adapter
def no_mask_dense(sam: nn.Module, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """SAM's dense prompt embedding when no mask prompt is given: ``(batch, 256, h, w)``."""
    w = sam.prompt_encoder.no_mask_embed.weight  # (1, 256)
    return w.reshape(1, -1, 1, 1).expand(batch, -1, size[0], size[1])


def decode_sparse(
    sam: nn.Module,
    embeddings: torch.Tensor,
    sparse: torch.Tensor,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder with given sparse prompt embeddings (no points, boxes or mask prompt).

    The tokens take the place of the prompt encoder's point/box embeddings (``sparse_prompt_embeddings``
    of ``MaskDecoder``); the dense embedding is the learned no-mask embedding, as in ``Sam.forward``
    without a mask input. Gradients flow into ``sparse`` (and into SAM's weights only if they require
    grad).

    Args:
        sam: a ``segment_anything`` ``Sam`` (prompt encoder + mask decoder are used).
        embeddings: ``(B, 256, 64, 64)`` image embeddings, one per prompt set.
        sparse: ``(B, T, 256)`` prompt tokens.
        multimask_output: return the 3 multimask outputs instead of the single-mask output.

    Returns:
        ``low_res_logits (B, M, 256, 256)`` and ``iou_predictions (B, M)``; M = 3 or 1.
    """
    from ppd.models.sam import _predict_masks_paired

    if sparse.ndim != 3 or embeddings.ndim != 4 or sparse.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings (B, 256, h, w) and sparse (B, T, 256), got {tuple(embeddings.shape)}, "
            f"{tuple(sparse.shape)}"
        )
    emb = embeddings.float()
    dense = no_mask_dense(sam, emb.shape[0], emb.shape[-2:]).to(emb)
    masks, iou = _predict_masks_paired(
        sam.mask_decoder, emb, sam.prompt_encoder.get_dense_pe().to(emb), sparse.to(emb), dense
    )
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]


def generate_and_decode(
    generator: ProxyPromptGenerator,
    sam: nn.Module,
    target: torch.Tensor,
    support: torch.Tensor,
    support_masks: torch.Tensor,
) -> tuple[torch.Tensor, ProxyPromptOutput]:
    """Generator + SAM decoder for every (target, object) pair.

    Args:
        generator: the PPG.
        sam: SAM model whose decoder matches ``target``'s embeddings.
        target: ``(B, 256, 64, 64)`` target SAM embeddings.
        support: support features/pixels ``(B, K, ...)`` (see :meth:`ProxyPromptGenerator.forward`).
        support_masks: ``(B, K, O, Hm, Wm)``.

    Returns:
        ``low_res_logits (B, O, 256, 256)`` and the generator output.
    """
    pe = sam.prompt_encoder.get_dense_pe()
    out = generator(target, support, support_masks, image_pe=pe)
    b, o, t, d = out.prompts.shape
    emb = target.float().unsqueeze(1).expand(b, o, *target.shape[1:]).reshape(b * o, *target.shape[1:])
    logits, _ = decode_sparse(sam, emb, out.prompts.reshape(b * o, t, d))
    return logits.reshape(b, o, *logits.shape[-2:]), out
