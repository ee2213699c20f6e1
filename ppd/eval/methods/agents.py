"""Rows of the trained PPD agents: ``attack(X)``, ``defense(X)`` and ``feature_matching+ppd``."""

from __future__ import annotations

import torch

from ppd.eval.registry import MethodContext, MethodOutput, register_method, register_template
from ppd.rl.rollout import greedy_defence, rollout


def _start(ctx: MethodContext, stems: list[str], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    start = ctx.state(source, stems)
    return torch.tensor([ctx.sid[s] for s in stems]), torch.stack([start[s] for s in stems])


@register_template(
    "attack",
    output="state",
    needs=("attacker",),
    config=("attack_steps",),
    description="the attacker's greedy roll-out from X's prompts (attack_steps actions)",
)
def attack(ctx: MethodContext, stems: list[str], source: str) -> dict[str, MethodOutput]:
    """The attacker's greedy roll-out (``attack_steps`` actions) from ``source``'s prompts."""
    ids, start = _start(ctx, stems, source)
    res = rollout(ctx.env, ctx.attacker, "attack", ids, start, ctx.cfg.attack_steps)
    return {s: MethodOutput(status=res.status[j]) for j, s in enumerate(stems)}


def defend(ctx: MethodContext, stems: list[str], source: str) -> dict[str, MethodOutput]:
    """The defender refines ``source``'s prompts (:func:`ppd.rl.rollout.greedy_defence`)."""
    d = ctx.defender
    ids, start = _start(ctx, stems, source)
    tr = greedy_defence(
        ctx.env, d.agent, ids, start, d.max_steps, d.keep_last_positive, d.sam_inputs, d.min_q
    )
    return {
        s: MethodOutput(
            status=tr.status[j], extra={"steps": int(tr.steps[j]), "stop_reason": tr.stop_reason[j]}
        )
        for j, s in enumerate(stems)
    }


register_template(
    "defense",
    output="state",
    needs=("defender",),
    description="the defender refines X's prompts (Q <= 0 stopping rule, step budget)",
)(defend)


@register_method("feature_matching+ppd", output="state", needs=("defender",), uses=("feature_matching",))
def feature_matching_ppd(ctx: MethodContext, stems: list[str]) -> dict[str, MethodOutput]:
    """FM + PPD: the defender refines the feature-matching prompts (= ``defense(feature_matching)``)."""
    return defend(ctx, stems, "feature_matching")
