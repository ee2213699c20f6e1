"""LoRA adapters on SAM through ``peft``, and a small adapter file format.

:func:`add_lora` wraps a SAM in a ``peft.PeftModel`` with LoRA on the ``nn.Linear`` layers of the chosen
parts (``mask_decoder`` by default; ``image_encoder`` for GPU runs). The base weights are frozen; with the
adapter disabled (``peft_model.disable_adapter()``) the network *is* the initial model, which SAMPO uses as
its frozen reference policy.

Adapter file (``torch.save`` of a dict, written atomically, read with ``weights_only=True``)::

    {"format": "ppd-lora", "version": 1, "sam_variant": "vit_t", "parts": ["mask_decoder"],
     "rank": 16, "alpha": 16.0, "target_modules": [...], "state_dict": {name: tensor}, "meta": {...}}

:func:`load_adapter` validates it (one-line errors naming the file) and :func:`apply_adapter` returns a
plain SAM with the LoRA weights merged in.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from ppd.io import atomic_write_bytes

__all__ = [
    "ADAPTER_FORMAT",
    "PARTS",
    "AdapterError",
    "add_lora",
    "adapter_payload",
    "apply_adapter",
    "load_adapter",
    "lora_targets",
    "save_adapter",
]

ADAPTER_FORMAT = "ppd-lora"
ADAPTER_VERSION = 1
PARTS = ("mask_decoder", "image_encoder", "prompt_encoder")
#: TinyViT's ImageNet classification head is never used by SAM
_SKIP = ("image_encoder.head",)


class AdapterError(ValueError):
    """A LoRA adapter file is missing, unreadable or does not fit the model."""


def lora_targets(sam: nn.Module, parts: tuple[str, ...] | list[str] = ("mask_decoder",)) -> list[str]:
    """Full names of the ``nn.Linear`` modules of SAM's ``parts`` that get LoRA.

    Raises:
        ValueError: an unknown part, or no linear layer found.
    """
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown LoRA part(s) {bad}; expected a subset of {PARTS}")
    names = [
        n
        for n, m in sam.named_modules()
        if isinstance(m, nn.Linear) and n.split(".", 1)[0] in parts and not n.startswith(_SKIP)
    ]
    if not names:
        raise ValueError(f"no nn.Linear layers in SAM parts {list(parts)}")
    return names


def add_lora(
    sam: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    parts: tuple[str, ...] | list[str] = ("mask_decoder",),
) -> PeftModel:
    """Wrap ``sam`` with LoRA adapters (in place; base weights frozen, LoRA ``B`` = 0 so the output is
    unchanged at first).

    Args:
        sam: a ``segment_anything`` SAM.
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r); ``None`` = ``rank``.
        dropout: LoRA dropout.
        parts: SAM sub-modules whose linear layers get adapters.

    Returns:
        The ``peft.PeftModel``; ``model.base_model.model`` is the (adapted) SAM.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=dropout,
        target_modules=lora_targets(sam, parts),
        bias="none",
    )
    return get_peft_model(sam, cfg)


def adapter_payload(model: PeftModel, sam_variant: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter file's dict for a LoRA-wrapped SAM."""
    cfg = model.peft_config["default"]
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    # full names of the adapted layers (peft itself may store shortened suffixes in cfg.target_modules)
    targets = sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))
    parts = sorted({t.split(".", 1)[0] for t in targets})
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "sam_variant": sam_variant,
        "parts": parts,
        "rank": int(cfg.r),
        "alpha": float(cfg.lora_alpha),
        "target_modules": targets,
        "state_dict": state,
        "meta": dict(meta or {}),
    }


def save_adapter(payload: dict[str, Any], path: str | Path) -> Path:
    """Write an adapter dict atomically (see :func:`adapter_payload`); returns the path."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_adapter(path: str | Path) -> dict[str, Any]:
    """Read and validate an adapter file.

    Raises:
        AdapterError: missing/unreadable file, or not a ``ppd-lora`` adapter (names the file and field).
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"LoRA adapter file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise AdapterError(f"cannot read LoRA adapter {path}: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path} is not a ppd LoRA adapter (field 'format' != {ADAPTER_FORMAT!r})")
    if payload.get("version") != ADAPTER_VERSION:
        raise AdapterError(f"{path}: unsupported adapter version {payload.get('version')!r}")
    for key in ("sam_variant", "rank", "alpha", "target_modules", "state_dict"):
        if key not in payload:
            raise AdapterError(f"{path}: field {key!r} is missing")
    if not isinstance(payload["state_dict"], dict) or not payload["state_dict"]:
        raise AdapterError(f"{path}: field 'state_dict' is empty")
    payload["path"] = str(path)
    return payload


def apply_adapter(
    sam: nn.Module, adapter: dict[str, Any] | str | Path, sam_variant: str | None = None
) -> nn.Module:
    """A copy of ``sam`` with the adapter's LoRA weights merged in (plain SAM module, eval mode).

    Args:
        sam: base SAM (not modified).
        adapter: a :func:`load_adapter` dict or an adapter file.
        sam_variant: the variant of ``sam``; checked against the adapter's when given.

    Raises:
        AdapterError: variant mismatch, or the adapter's tensors do not fit ``sam``.
    """
    payload = load_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
    where = payload.get("path", "adapter")
    if sam_variant is not None and payload["sam_variant"] != sam_variant:
        raise AdapterError(
            f"{where}: adapter trained on SAM {payload['sam_variant']!r}, cannot apply it to {sam_variant!r}"
        )
    base = copy.deepcopy(sam)
    cfg = LoraConfig(
        r=int(payload["rank"]),
        lora_alpha=float(payload["alpha"]),
        lora_dropout=0.0,
        target_modules=list(payload["target_modules"]),
        bias="none",
    )
    try:
        model = get_peft_model(base, cfg)
        result = set_peft_model_state_dict(model, payload["state_dict"])
    except (ValueError, RuntimeError, KeyError) as err:
        raise AdapterError(f"{where} does not fit this SAM: {err}") from err
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise AdapterError(f"{where}: adapter tensors not used by the model: {missing[:3]}")
    return model.merge_and_unload().eval()
