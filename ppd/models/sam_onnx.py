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
from ppd.models.sam_cached import ImageSideCache
from ppd.weights import cache_dir

log = logging.getLogger(__name__)

#: PromptEnv decoder backends: eager torch, ONNX Runtime, and both with the image side cached per image
#: (:mod:`ppd.models.sam_cached`; exact, fewer FLOPs per prompt set)
BACKENDS = ("torch", "onnx", "torch_cached", "onnx_cached")
#: ONNX Runtime graph optimisation levels by name
OPT_LEVELS = ("disable", "basic", "extended", "all")


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


class _CachedDecoderGraph(nn.Module):
    """Export wrapper of :func:`ppd.models.sam_cached.predict_masks_cached` (single mask).

    Inputs: ``keys (B, HW, 256)``, ``k_t2i``, ``v_t2i``, ``q_i2t`` ``(B, HW, 128)`` (the image-side cache)
    and ``sparse (B, T, 256)``; the dense positional encoding is a constant of the graph.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        pe = sam.prompt_encoder.get_dense_pe()
        self.size = (int(pe.shape[-2]), int(pe.shape[-1]))
        self.register_buffer("pe", pe.flatten(2).permute(0, 2, 1).contiguous().detach(), persistent=False)

    def forward(
        self,
        keys: torch.Tensor,
        k_t2i: torch.Tensor,
        v_t2i: torch.Tensor,
        q_i2t: torch.Tensor,
        sparse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ppd.models.sam_cached import ImageSideCache, predict_masks_cached

        cache = ImageSideCache(keys, self.pe, k_t2i, v_t2i, q_i2t, self.size)
        masks, iou = predict_masks_cached(self.sam.mask_decoder, cache, sparse)
        return masks[:, :1], iou[:, :1]


def _weights_key(sam: Sam) -> str:
    """sha256 (16 hex) over the decoder and prompt-encoder parameters and buffers that the graph bakes in."""
    h = hashlib.sha256()
    for prefix, mod in (("d", sam.mask_decoder), ("p", sam.prompt_encoder)):
        for name, t in sorted(mod.state_dict().items()):
            h.update(f"{prefix}.{name}{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_decoder(sam: Sam, path: Path, image_cache: bool = False) -> None:
    """Export SAM's mask decoder (single-mask output) to ONNX at ``path`` (atomic: temp file + rename).

    Args:
        sam: the SAM model.
        path: destination ``.onnx`` file.
        image_cache: export the variant whose inputs are the per-image cache of
            :func:`ppd.models.sam_cached.image_side_cache` instead of the raw embeddings.
    """
    sparse = torch.zeros(2, 5, sam.prompt_encoder.embed_dim)
    if image_cache:
        model: nn.Module = _CachedDecoderGraph(sam).eval()
        hw, ci = 64 * 64, sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.internal_dim
        args = (
            torch.zeros(2, hw, 256),
            torch.zeros(2, hw, ci),
            torch.zeros(2, hw, ci),
            torch.zeros(2, hw, ci),
        )
        names = ["keys", "k_t2i", "v_t2i", "q_i2t"]
    else:
        model, args, names = _DecoderGraph(sam).eval(), (torch.zeros(2, 256, 64, 64),), ["embeddings"]
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (*args, sparse),
            buf,
            input_names=[*names, "sparse"],
            output_names=["low_res_logits", "iou"],
            dynamic_axes={**{n: {0: "b"} for n in names}, "sparse": {0: "b", 1: "t"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter handles this graph without extra dependencies
        )
    atomic_write_bytes(path, buf.getvalue())


def quantize_decoder(src: Path, dest: Path) -> None:
    """Dynamic int8 quantisation (weights int8, activations quantised per call) of an exported decoder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_name(dest.name + ".tmp.onnx")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    tmp.replace(dest)


class OnnxDecoder:
    """Drop-in for ``decode(sam, embeddings, points, labels)`` (single-mask output, no gradients).

    Args:
        sam: the SAM whose decoder is exported (its weights are hashed into the cache key).
        threads: ONNX Runtime intra-op threads; ``None`` = ``torch.get_num_threads()``.
        cache: directory of exported graphs; ``None`` = ``<ppd cache>/onnx``.
        image_cache: export the graph that takes the per-image cache of
            :func:`ppd.models.sam_cached.image_side_cache` (pass it to :meth:`__call__`).
        optimization: ONNX Runtime graph optimisation level, one of :data:`OPT_LEVELS`.
        quantize: dynamic int8 quantisation of the graph's MatMul weights (``quantize_dynamic``).
    """

    def __init__(
        self,
        sam: Sam,
        threads: int | None = None,
        cache: str | Path | None = None,
        image_cache: bool = False,
        optimization: str = "all",
        quantize: bool = False,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
            raise ImportError("decoder_backend='onnx' needs onnxruntime: pip install onnxruntime") from e
        if optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {OPT_LEVELS}, got {optimization!r}")
        self.sam = sam
        self.image_cache = image_cache
        root = Path(cache) if cache is not None else cache_dir() / "onnx"
        stem = f"sam_decoder{'_cached' if image_cache else ''}_{_weights_key(sam)}"
        fp32 = root / f"{stem}.onnx"
        self.path = root / f"{stem}_int8.onnx" if quantize else fp32
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]

        def build() -> None:
            log.info("exporting SAM's mask decoder to %s", fp32)
            export_decoder(sam, fp32, image_cache=image_cache)
            if quantize:
                quantize_decoder(fp32, self.path)

        if not self.path.exists():
            build()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a truncated/corrupt file from elsewhere: rebuild once
            log.warning("cached ONNX decoder %s unreadable (%s): re-exporting", self.path, e)
            build()
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def __call__(
        self,
        embeddings: torch.Tensor | None,
        points: torch.Tensor,
        labels: torch.Tensor,
        image_cache: ImageSideCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt sets.

        Args:
            embeddings: ``(B, 256, 64, 64)`` or ``(1, 256, 64, 64)`` shared by all sets (graphs exported
                without ``image_cache``; ignored otherwise).
            points: ``(B, N, 2)`` in SAM's input frame.
            labels: ``(B, N)``; 1 positive, 0 negative, -1 padding.
            image_cache: the embeddings' :class:`~ppd.models.sam_cached.ImageSideCache` (1 or B rows);
                required by, and only accepted by, a decoder built with ``image_cache=True``.

        Returns:
            ``(B, 1, 256, 256)`` low-res logits and ``(B, 1)`` IoU predictions (float32, CPU).
        """
        if self.image_cache != (image_cache is not None):
            want = "an image_cache" if self.image_cache else "embeddings, not an image_cache"
            raise ValueError(f"this ONNX decoder was built with image_cache={self.image_cache}: pass {want}")
        b = points.shape[0]
        sparse, _ = self.sam.prompt_encoder(
            points=(points.to(self.sam.device, torch.float32), labels.to(self.sam.device)),
            boxes=None,
            masks=None,
        )
        feed = {"sparse": sparse.float().cpu().numpy()}
        if image_cache is not None:
            c = image_cache.expand(b)
            for name in ("keys", "k_t2i", "v_t2i", "q_i2t"):
                feed[name] = np.ascontiguousarray(getattr(c, name).to("cpu", torch.float32).numpy())
        else:
            emb = embeddings.to("cpu", torch.float32)
            if emb.shape[0] == 1 and b > 1:
                emb = emb.expand(b, -1, -1, -1)
            feed["embeddings"] = np.ascontiguousarray(emb.numpy())
        logits, iou = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(iou)
