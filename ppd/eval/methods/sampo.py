"""Evaluation rows of the SAMPO baseline: seeded 3 positive + 3 negative GT clicks for every row.

* ``sam_sparse`` -- the un-tuned SAM (``ctx.sam``);
* ``sampo`` -- SAMPO-fine-tuned (LoRA adapter from ``checkpoints: {sampo: adapter.pt}``);
* ``sam_finetuned_sup`` -- plain supervised fine-tuning (L_SUP only), same schedule;
* ``sampo_no_po1`` / ``sampo_no_po2`` -- the ablations without the inter- / intra-prompt term.

All rows draw their clicks from ``ctx.generator(stem)`` (seeded from the eval seed and the stem,
identical across methods), so every row sees the same prompts. ``method_options: {<row>: {points:
[3, 3], multimask: true}}``: click counts and the output rule (best of SAM's 3 masks by predicted IoU,
or the single-mask output). Adapters are exported with ``python -m ppd.export_lora`` (or written by
``SAMPOTask`` at the end of training) and merged into a copy of ``ctx.sam``.
"""

from __future__ import annotations

from typing import Any

from ppd.baselines.sparse import predict_sparse
from ppd.eval.registry import MethodContext, MethodOutput, register_method
from ppd.models.lora import apply_adapter


def _run(ctx: MethodContext, stems: list[str], sam: Any, name: str) -> dict[str, MethodOutput]:
    opts = ctx.options()
    n_pos, n_neg = (int(x) for x in opts.get("points", (3, 3)))
    multimask = bool(opts.get("multimask", True))
    out = {}
    for s in stems:
        f = ctx.features(s)
        pred = predict_sparse(
            sam, f.sam_embedding.float(), f.input_size, f.original_size, ctx.gt_mask(s), ctx.generator(s),
            n_pos, n_neg, multimask=multimask,
        )  # fmt: skip
        out[s] = MethodOutput(
            mask=pred.mask,
            extra={"points": pred.points.tolist(), "labels": pred.labels.tolist(), "mask_slot": pred.slot},
        )
    return out


def _adapted(ctx: MethodContext) -> Any:
    """``ctx.sam`` with the row's LoRA adapter merged in (the adapter's SAM variant must match)."""
    variant = (ctx.cfg.env or {}).get("sam_variant", "vit_t")
    return apply_adapter(ctx.sam, ctx.checkpoint(), sam_variant=variant)


@register_method(
    "sam_sparse",
    output="mask",
    needs=(),
    description="un-tuned SAM, seeded 3 positive + 3 negative GT clicks",
)
def sam_sparse(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    return _run(ctx, stems, ctx.sam, "sam_sparse")


def _register_adapter_row(name: str, description: str) -> None:
    @register_method(name, output="mask", needs=("checkpoint",), description=description)
    def _row(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
        return _run(ctx, stems, _adapted(ctx), name)


_register_adapter_row("sampo", "SAMPO-fine-tuned SAM (LoRA), same seeded 3+3 clicks")
_register_adapter_row("sam_finetuned_sup", "SAM fine-tuned with L_SUP only (LoRA, same schedule), 3+3 clicks")
_register_adapter_row("sampo_no_po1", "SAMPO without the inter-prompt term L_PO1, 3+3 clicks")
_register_adapter_row("sampo_no_po2", "SAMPO without the intra-prompt term L_PO2, 3+3 clicks")
