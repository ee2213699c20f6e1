"""Training-free prompt states on the node grid: ideal (GT-labelled grid), feature matching (the
``feature_matching:`` block, and one ``fm_<variant>`` row per FM variant with its source's recipe),
PerSAM-style."""

from __future__ import annotations

from typing import Any

from ppd.env.fm_variants import FM_PRESETS, FM_VARIANTS
from ppd.env.graph import pool_tokens
from ppd.env.prompts import ideal_prompts, persam_prompts, prompts_from_reference
from ppd.eval.registry import MethodContext, MethodOutput, register_method


@register_method("ideal", output="state", config=("ideal",))
def ideal(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """Ideal prompts: GT-labelled node grid with capped, seeded counts (``ideal:`` block)."""
    return {
        s: MethodOutput(
            status=ideal_prompts(ctx.gt_mask(s), ctx.grid, generator=ctx.generator(s), **ctx.cfg.ideal)
        )
        for s in stems
    }


def _matching(ctx: MethodContext, stems: list[str], options: dict[str, Any]) -> dict[str, MethodOutput]:
    ref = ctx.reference
    out = {}
    for s in stems:
        st, info = prompts_from_reference(
            ref.features.dino_tokens, ref.mask, ctx.features(s).dino_tokens, ctx.grid, **options
        )
        extra = {"no_positive": bool(info["no_positive"]), "n_pos": info["n_pos"], "n_neg": info["n_neg"]}
        out[s] = MethodOutput(status=st, extra=extra)
    return out


@register_method("feature_matching", output="state", needs=("reference",), config=("feature_matching",))
def feature_matching(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """One-shot prompts by DINOv2 patch matching against the reference (``feature_matching:`` block)."""
    return _matching(ctx, stems, dict(ctx.cfg.feature_matching))


def _register_variant(variant: str) -> None:
    def produce(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
        return _matching(ctx, stems, {**FM_PRESETS[variant], **ctx.options(), "variant": variant})

    register_method(
        f"fm_{variant}",
        output="state",
        needs=("reference",),
        description=f"FM variant '{variant}' with its source's recipe (ppd.env.fm_variants; "
        f"method_options.fm_{variant} overrides)",
    )(produce)


for _variant in FM_VARIANTS:
    _register_variant(_variant)


@register_method("persam", output="state", needs=("reference",))
def persam(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """Training-free PerSAM-style prompts (one positive, one negative node) from the reference."""
    ref_tokens = pool_tokens(ctx.reference.features.dino_tokens.float(), ctx.grid)
    return {
        s: MethodOutput(
            status=persam_prompts(
                ref_tokens, ctx.reference.mask, pool_tokens(ctx.features(s).dino_tokens.float(), ctx.grid)
            )
        )
        for s in stems
    }
