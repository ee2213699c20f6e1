"""Shared fixtures: tiny random SAM/DINOv2 built by the same builders as the real ones, synthetic data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PPD_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_sam() -> torch.nn.Module:
    """Random tiny SAM (same builder as the real variants)."""
    from ppd.models.sam import build_sam

    torch.manual_seed(0)
    return build_sam("tiny", None)


@pytest.fixture(scope="session")
def tiny_env_inputs(tiny_sam: torch.nn.Module):
    """(features, masks) of 4 synthetic images: random SAM embeddings + tiny-DINOv2 tokens."""
    from ppd.data.features import CachedFeatures
    from ppd.models.dinov2 import build_dinov2, patch_tokens
    from ppd.models.sam import IMAGE_SIZE
    from tests.helpers.synthetic import make_samples

    torch.manual_seed(0)
    dino = build_dinov2("tiny")
    feats, masks = [], []
    for i, s in enumerate(make_samples(4, seed=3)):
        h, w = s.mask.shape
        scale = IMAGE_SIZE / max(h, w)
        g = torch.Generator().manual_seed(i)
        feats.append(
            CachedFeatures(
                sam_embedding=torch.randn(256, 64, 64, generator=g).half(),
                input_size=(int(h * scale + 0.5), int(w * scale + 0.5)),
                original_size=(h, w),
                dino_tokens=patch_tokens(dino, s.image, 112).half(),
                key=f"synthetic{i}",
            )
        )
        masks.append(s.mask)
    return feats, masks
