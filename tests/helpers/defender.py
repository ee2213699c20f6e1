"""Tiny defender files for inference / evaluation tests (random ``QNetwork`` in the export format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ppd.export import FORMAT
from ppd.models.qnet import QNetwork

TINY_ENV: dict[str, Any] = {
    "grid": 8,
    "k_feature": 4,
    "k_physical": 4,
    "ideal_interval": 1,
    "ideal_max_pos": 10,
    "ideal_max_neg": 10,
    "sam_variant": "tiny",
    "dino_name": "tiny",
    "dino_resolution": 112,
    "feature_dim": 48 + 5,
}


def write_tiny_defender(path: Path, seed: int = 0, **env_overrides: Any) -> Path:
    """Save a randomly initialised defender ``QNetwork`` (tiny DINOv2 width 48) as ``ppd-defender-v1``."""
    torch.manual_seed(seed)
    cfg = {"in_dim": 48 + 5, "out_per_node": 1, "hidden": 16, "layers": 1, "heads": 2, "conv": "transformer"}
    qnet = QNetwork(**cfg)
    payload = {
        "format": FORMAT,
        "qnet_config": cfg,
        "env_config": {**TINY_ENV, **env_overrides},
        "state_dict": qnet.state_dict(),
        "trained": {"episodes": 0, "env_steps": 0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def write_tiny_training_checkpoint(path: Path, seed: int = 0) -> Path:
    """A minimal PPD training checkpoint with random attacker and defender (enough for ``load_attacker``)."""
    torch.manual_seed(seed)
    hp = {"feature_dim": 48 + 5, "hidden": 16, "layers": 1, "heads": 2, "conv": "transformer"}
    q_att = QNetwork(in_dim=53, out_per_node=2, hidden=16, layers=1, heads=2, conv="transformer")
    q_def = QNetwork(in_dim=53, out_per_node=1, hidden=16, layers=1, heads=2, conv="transformer")
    state = {f"q_att.{k}": v for k, v in q_att.state_dict().items()}
    state.update({f"q_def.{k}": v for k, v in q_def.state_dict().items()})
    ckpt = {
        "state_dict": state,
        "hyper_parameters": hp,
        "ppd": {"env_config": dict(TINY_ENV), "episode": 0, "env_steps": 0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


class FakeFeatureCache:
    """Stand-in for :class:`ppd.data.features.FeatureCache` without the SAM image encoder (fast tests).

    ``get(image)`` returns a seeded random SAM embedding (seed = content hash) and tiny-DINOv2 tokens at
    112 px (8 x 8), so results are deterministic within a process. ``calls`` counts ``get`` calls.
    """

    def __init__(self) -> None:
        from types import SimpleNamespace

        from ppd.models.dinov2 import build_dinov2

        torch.manual_seed(0)
        self.dino = build_dinov2("tiny")
        self.config = SimpleNamespace(sam_variant="tiny", dino_name="tiny", dino_resolution=112)
        self.calls = 0

    def get(self, image: Any, key: str | None = None) -> Any:
        from ppd.data.features import CachedFeatures, image_key
        from ppd.models.dinov2 import patch_tokens
        from ppd.models.sam import IMAGE_SIZE

        self.calls += 1
        key = key or image_key(image)
        h, w = image.shape[:2]
        scale = IMAGE_SIZE / max(h, w)
        g = torch.Generator().manual_seed(int(key[:8], 16))
        return CachedFeatures(
            sam_embedding=torch.randn(256, 64, 64, generator=g).half(),
            input_size=(int(h * scale + 0.5), int(w * scale + 0.5)),
            original_size=(h, w),
            dino_tokens=patch_tokens(self.dino, image, 112).half(),
            key=key,
        )


def oracle_decode(
    sam: Any, embeddings: Any, points: Any, labels: Any, multimask_output: bool = False, grad: bool = False
) -> Any:
    """Stand-in for :func:`ppd.models.sam.decode`: logits +1 everywhere if any label is positive, else -1.

    So the predicted mask is the whole image when a positive prompt is active and empty otherwise, which
    makes the expected Dice computable by hand: ``2 |G| / (|G| + H W)``.
    """
    b = points.shape[0]
    m = 3 if multimask_output else 1
    pos = (labels == 1).any(dim=1).float() * 2 - 1  # (B,)
    logits = pos[:, None, None, None].expand(b, m, 256, 256).clone()
    iou = torch.linspace(0.1, 0.9, m).expand(b, m).clone()
    return logits, iou


#: half-width (SAM input-frame pixels) added around the box of the positive points by :func:`box_decode`
BOX_MARGIN = 4.0


def box_decode(
    sam: Any, embeddings: Any, points: Any, labels: Any, multimask_output: bool = False, grad: bool = False
) -> Any:
    """Prompt-dependent stand-in for :func:`ppd.models.sam.decode`: the box of the positive points.

    Logits are +1 on the low-res pixels whose centre (SAM input frame: ``4 j + 2``) lies inside the
    bounding box of the positive points widened by :data:`BOX_MARGIN`, and -1 elsewhere (all -1 without a
    positive). Negative points do not change the mask. At original resolution the prediction is then the
    pixels whose centre lies in the box of the positives widened by a quarter of an original pixel (for
    images whose side is 1/16 of SAM's 1024 frame, e.g. the 64 x 48 synthetic ones), so the expected Dice
    of any prompt set can be computed by hand (:func:`box_mask`).
    """
    b, m = points.shape[0], 3 if multimask_output else 1
    centre = torch.arange(256, dtype=torch.float32) * 4 + 2
    out = torch.full((b, m, 256, 256), -1.0)
    for i in range(b):
        pos = points[i][labels[i] == 1]
        if pos.numel() == 0:
            continue
        lo, hi = pos.min(0).values - BOX_MARGIN, pos.max(0).values + BOX_MARGIN
        inx = (centre >= lo[0]) & (centre <= hi[0])
        iny = (centre >= lo[1]) & (centre <= hi[1])
        out[i, :, iny[:, None] & inx[None, :]] = 1.0
    iou = torch.linspace(0.1, 0.9, m).expand(b, m).clone()
    return out, iou


def box_mask(points: Any, labels: Any, height: int, width: int, scale: float = 16.0) -> Any:
    """The mask :func:`box_decode` predicts at original resolution, computed by hand (numpy).

    Args:
        points: ``(K, 2)`` ``(x, y)`` original pixels.
        labels: ``(K,)`` 1 positive / 0 negative.
        height: image height ``H``.
        width: image width ``W``.
        scale: SAM input frame / original (16 for 64-pixel-wide images).

    Returns:
        ``(H, W)`` bool: pixel centres inside the box of the positives widened by ``BOX_MARGIN / scale``.
    """
    import numpy as np

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)[np.asarray(labels).reshape(-1) == 1]
    mask = np.zeros((height, width), dtype=bool)
    if len(pts) == 0:
        return mask
    r = BOX_MARGIN / scale
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    inx = (xs >= pts[:, 0].min() - r) & (xs <= pts[:, 0].max() + r)
    iny = (ys >= pts[:, 1].min() - r) & (ys <= pts[:, 1].max() + r)
    return iny[:, None] & inx[None, :]
