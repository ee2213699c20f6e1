"""SAM's mask decoder as the judge of :class:`~ppd.env.prompt_env.PromptEnv`: one small protocol, four backends.

A decoder maps an image input and B prompt sets to SAM's low-res logits::

    decoder.decode(image, points (B, K, 2), labels (B, K)) -> (logits (B, M, 256, 256), iou (B, M))

where ``image`` is the cached embeddings ``(B, 256, 64, 64)`` or, for a decoder with ``cached = True``, their
prompt-independent image side (:class:`~ppd.models.sam_cached.ImageSideCache`, computed once per image).
:func:`build_decoder` builds one from the ``decoder_backend`` name, once; the environment never branches
on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ppd.models.sam import decode
from ppd.models.sam_cached import ImageSideCache
from ppd.models.sam_onnx import BACKENDS, OnnxDecoder

__all__ = ["BACKENDS", "Decoder", "TorchDecoder", "OnnxRuntimeDecoder", "build_decoder"]


class Decoder(Protocol):
    """What :class:`~ppd.env.prompt_env.PromptEnv` needs of SAM's mask decoder."""

    #: takes :class:`~ppd.models.sam_cached.ImageSideCache` rows instead of raw embeddings
    cached: bool

    def decode(self, image: Tensor | ImageSideCache, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(B, M, 256, 256)`` and IoU predictions ``(B, M)`` of B prompt sets (input frame, -1 = pad)."""
        ...


@dataclass
class TorchDecoder:
    """Eager PyTorch decoder (:func:`ppd.models.sam.decode`), any device."""

    sam: torch.nn.Module
    cached: bool = False

    def decode(self, image: Tensor | ImageSideCache, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.cached:
            return decode(self.sam, None, points, labels, image_cache=image)
        return decode(self.sam, image, points, labels)


@dataclass
class OnnxRuntimeDecoder:
    """SAM's mask decoder exported to ONNX Runtime (:class:`ppd.models.sam_onnx.OnnxDecoder`), CPU."""

    onnx: OnnxDecoder
    cached: bool = False

    def decode(self, image: Tensor | ImageSideCache, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.cached:
            return self.onnx(None, points, labels, image_cache=image)
        return self.onnx(image, points, labels)


def build_decoder(sam: torch.nn.Module, backend: str = "torch", **onnx_options: Any) -> Decoder:
    """The decoder of a ``decoder_backend`` name.

    Args:
        sam: SAM model (its prompt encoder and mask decoder are used or exported).
        backend: ``torch`` / ``onnx`` (raw embeddings) or ``torch_cached`` / ``onnx_cached`` (image side
            computed once per image; exact up to float rounding).
        **onnx_options: :class:`~ppd.models.sam_onnx.OnnxDecoder` options (``threads``, ``quantize``, ...).

    Raises:
        ValueError: an unknown backend (names the choices).
    """
    if backend not in BACKENDS:
        raise ValueError(f"decoder_backend must be one of {BACKENDS}, got {backend!r}")
    cached = backend.endswith("_cached")
    if backend.startswith("onnx"):
        return OnnxRuntimeDecoder(OnnxDecoder(sam, image_cache=cached, **onnx_options), cached=cached)
    return TorchDecoder(sam, cached=cached)
