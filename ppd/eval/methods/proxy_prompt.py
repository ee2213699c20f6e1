"""Evaluation rows ``proxy_prompt`` (trained generator) and ``proxy_prompt_untrained`` (same architecture,
seeded random initialisation).

Options (``method_options: {proxy_prompt: {...}, proxy_prompt_untrained: {...}}`` of the eval config)::

    support: {root: <train data set>, split: <train split file or stems>, kind: folder, k: 1, seed: 0}
    generator: {...}    # untrained row only: ProxyPromptConfig fields (default: the generator defaults)
    init_seed: 0        # untrained row only: seed of the random initialisation

For every evaluated image, ``k`` support (image, mask) pairs are drawn from the *training* split,
deterministically from ``(support.seed, image stem)`` (:func:`draw_support`); their stems are recorded in
the image's ``extra`` (``support``). The trained row loads the generator (and any LoRA weights of SAM's
decoder) from ``checkpoints: {proxy_prompt: PATH}`` (a :class:`ppd.tasks.proxy_prompt.ProxyPromptTask`
checkpoint).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ppd.eval.registry import MethodContext, MethodOutput, register_method
from ppd.models.proxy_prompt import ProxyPromptConfig, ProxyPromptGenerator, generate_and_decode
from ppd.models.sam import upscale_logits
from ppd.tasks.proxy_prompt import draw_support, low_res_mask

SUPPORT_KEYS = ("root", "split", "kind", "k", "seed")


class SupportSet:
    """The support pool (training split) with lazily cached SAM embeddings and low-res masks."""

    def __init__(self, ctx: MethodContext, spec: dict[str, Any]) -> None:
        from ppd.data.layouts import build_dataset

        missing = [k for k in ("root", "split") if k not in spec]
        if missing:
            raise ValueError(
                f"method_options.<proxy_prompt>.support lacks {missing} (the training split to draw from)"
            )
        unknown = sorted(set(spec) - set(SUPPORT_KEYS))
        if unknown:
            raise ValueError(
                f"method_options.<proxy_prompt>.support: unknown keys {unknown}; expected {SUPPORT_KEYS}"
            )
        self.ctx = ctx
        self.root = str(spec["root"])
        self.k = int(spec.get("k", 1))
        self.seed = int(spec.get("seed", 0))
        self.dataset = build_dataset(spec.get("kind", "folder"), self.root, split=spec["split"])
        self.stems = self.dataset.stems
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding (256, 64, 64), mask (256, 256))`` of pool entry ``i``."""
        if i not in self._items:
            s = self.dataset[i]
            f = self.ctx.cache.get(s.image)
            self._items[i] = (f.sam_embedding.float(), low_res_mask(s.mask, f.input_size))
        return self._items[i]

    def for_target(self, stem: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Support stems, ``(1, K, 256, 64, 64)`` embeddings and ``(1, K, 1, 256, 256)`` masks for ``stem``."""
        idx = draw_support(self.stems, stem, self.k, self.seed)
        items = [self.item(i) for i in idx]
        emb = torch.stack([e for e, _ in items])[None]
        masks = torch.stack([m for _, m in items])[None, :, None]
        return [self.stems[i] for i in idx], emb, masks


def _predict(
    ctx: MethodContext, stems: list[str], gen: ProxyPromptGenerator, sam: torch.nn.Module, support: SupportSet
) -> dict[str, MethodOutput]:
    if gen.config.backbone != "sam":
        raise ValueError(
            f"the eval rows support the 'sam' contextual encoder only, got {gen.config.backbone!r}"
        )
    out: dict[str, MethodOutput] = {}
    gen.eval()
    for s in stems:
        f = ctx.features(s)
        sup_stems, emb, masks = support.for_target(s)
        with torch.inference_mode():
            logits, _ = generate_and_decode(gen, sam, f.sam_embedding.float()[None], emb, masks)
        up = upscale_logits(logits[:, :1].float(), f.input_size, f.original_size)
        out[s] = MethodOutput(
            mask=(up[0, 0] > 0).numpy(),
            extra={"support": sup_stems, "support_root": support.root, "k": support.k},
        )
    return out


@register_method(
    "proxy_prompt",
    output="mask",
    needs=("checkpoint",),
    description="Proxy Prompt: trained support-image prompt generator -> SAM sparse prompt tokens (no clicks)",
)
def proxy_prompt(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """Trained Proxy Prompt Generator on k support pairs from the training split."""
    from ppd.tasks.proxy_prompt import load_generator

    opts = ctx.options()
    sam = ctx.sam
    path = ctx.checkpoint()
    meta_sam = torch.load(path, map_location="cpu", weights_only=True).get("proxy_prompt", {})
    variant = getattr(getattr(ctx.cache, "config", None), "sam_variant", None)
    if variant is not None and meta_sam.get("sam_variant") not in (None, variant):
        raise ValueError(
            f"{path}: generator trained on SAM {meta_sam.get('sam_variant')!r} embeddings, eval uses {variant!r}"
        )
    if meta_sam.get("lora_rank", 0) > 0:
        sam = copy.deepcopy(sam)  # LoRA weights go into a copy, never into the shared SAM
    gen, _ = load_generator(str(path), sam)
    return _predict(ctx, stems, gen, sam, SupportSet(ctx, dict(opts.get("support", {}))))


@register_method(
    "proxy_prompt_untrained",
    output="mask",
    needs=(),
    description="Proxy Prompt generator with a seeded random initialisation (untrained control)",
)
def proxy_prompt_untrained(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """Same architecture as the trained row, random weights: what the training adds."""
    opts = ctx.options()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opts.get("init_seed", 0)))
        gen = ProxyPromptGenerator(ProxyPromptConfig(**dict(opts.get("generator", {}))))
    return _predict(ctx, stems, gen, ctx.sam, SupportSet(ctx, dict(opts.get("support", {}))))
