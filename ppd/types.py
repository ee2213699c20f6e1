"""Records and constants shared by every layer (data → env → agents → eval); imports nothing from ppd.

The feature record lives here, below both ``ppd.data`` (which fills it) and ``ppd.env`` (which reads it),
so that no module imports against the data flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: prompt status of a node: inactive, active positive, active negative
INACTIVE, POSITIVE, NEGATIVE = 0, 1, 2
NUM_STATUS = 3
#: the two agents of PPD
ROLES: tuple[str, str] = ("attack", "defend")


@dataclass
class CachedFeatures:
    """Cached features of one image.

    Attributes:
        sam_embedding: ``(256, 64, 64)`` fp16 SAM image embedding.
        input_size: ``(h, w)`` of the image inside SAM's 1024 frame.
        original_size: ``(H, W)``.
        dino_tokens: ``(G, G, C)`` fp16 DINOv2 patch tokens.
        key: the image content hash.
    """

    sam_embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    dino_tokens: torch.Tensor
    key: str
