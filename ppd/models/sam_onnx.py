"""SAM's mask decoder run by ONNX Runtime: the RL reward loop's fast path on CPU.

The mask decoder is the environment's bottleneck (~100 ms per prompt set for MobileSAM on one CPU thread in
eager PyTorch, dominated by memory-bound adds/copies between small kernels). ONNX Runtime fuses those and
runs the same computation about 2x faster with logits equal to ~1e-5
(``experiments/benchmarks/env_throughput.py`` measures both, side by side, with the reward agreement).

Only the decoder is exported; the prompt encoder (a few hundred FLOPs per point, and a boolean-index
assignment that does not export) stays in PyTorch. The exported graph holds the decoder's weights, so it is
cached under ``<ppd cache>/onnx/`` keyed by a hash of those weights; a stale or corrupt file is rebuilt.
Inference only: there are no gradients through this path (use :func:`ppd.models.sam.decode` with
``grad=True`` for fine-tuning).
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn

from ppd.io import atomic_write_bytes
from ppd.weights import cache_dir

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


class _DecoderGraph(nn.Module):
    """Export wrapper: ``(B, 256, 64, 64)`` embeddings + ``(B, T, 256)`` sparse prompt tokens -> single mask."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, embeddings: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ppd.models.sam import _predict_masks_paired

        pe = self.sam.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)  # what PromptEncoder returns without a mask
        masks, iou = _predict_masks_paired(
            self.sam.mask_decoder, embeddings, pe.get_dense_pe(), sparse, dense
        )
        return masks[:, :1], iou[:, :1]


def _weights_key(sam: Sam) -> str:
    """sha256 (16 hex) over the decoder and prompt-encoder parameters and buffers that the graph bakes in."""
    h = hashlib.sha256()
    for prefix, mod in (("d", sam.mask_decoder), ("p", sam.prompt_encoder)):
        for name, t in sorted(mod.state_dict().items()):
            h.update(f"{prefix}.{name}{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_decoder(sam: Sam, path: Path) -> None:
    """Export SAM's mask decoder (single-mask output) to ONNX at ``path`` (atomic: temp file + rename)."""
    model = _DecoderGraph(sam).eval()
    emb = torch.zeros(2, 256, 64, 64)
    sparse = torch.zeros(2, 5, sam.prompt_encoder.embed_dim)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (emb, sparse),
            buf,
            input_names=["embeddings", "sparse"],
            output_names=["low_res_logits", "iou"],
            dynamic_axes={"embeddings": {0: "b"}, "sparse": {0: "b", 1: "t"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter handles this graph without extra dependencies
        )
    atomic_write_bytes(path, buf.getvalue())


class OnnxDecoder:
    """Drop-in for ``decode(sam, embeddings, points, labels)`` (single-mask output, no gradients).

    Args:
        sam: the SAM whose decoder is exported (its weights are hashed into the cache key).
        threads: ONNX Runtime intra-op threads; ``None`` = ``torch.get_num_threads()``.
        cache: directory of exported graphs; ``None`` = ``<ppd cache>/onnx``.
    """

    def __init__(self, sam: Sam, threads: int | None = None, cache: str | Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
            raise ImportError("decoder_backend='onnx' needs onnxruntime: pip install onnxruntime") from e
        self.sam = sam
        root = Path(cache) if cache is not None else cache_dir() / "onnx"
        self.path = root / f"sam_decoder_{_weights_key(sam)}.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not self.path.exists():
            log.info("exporting SAM's mask decoder to %s", self.path)
            export_decoder(sam, self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a truncated/corrupt file from elsewhere: rebuild once
            log.warning("cached ONNX decoder %s unreadable (%s): re-exporting", self.path, e)
            export_decoder(sam, self.path)
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def __call__(
        self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt sets.

        Args:
            embeddings: ``(B, 256, 64, 64)`` or ``(1, 256, 64, 64)`` shared by all sets.
            points: ``(B, N, 2)`` in SAM's input frame.
            labels: ``(B, N)``; 1 positive, 0 negative, -1 padding.

        Returns:
            ``(B, 1, 256, 256)`` low-res logits and ``(B, 1)`` IoU predictions (float32, CPU).
        """
        b = points.shape[0]
        sparse, _ = self.sam.prompt_encoder(
            points=(points.to(self.sam.device, torch.float32), labels.to(self.sam.device)),
            boxes=None,
            masks=None,
        )
        emb = embeddings.to("cpu", torch.float32)
        if emb.shape[0] == 1 and b > 1:
            emb = emb.expand(b, -1, -1, -1)
        logits, iou = self.session.run(
            None,
            {"embeddings": np.ascontiguousarray(emb.numpy()), "sparse": sparse.float().cpu().numpy()},
        )
        return torch.from_numpy(logits), torch.from_numpy(iou)
