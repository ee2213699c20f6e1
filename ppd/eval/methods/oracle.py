"""Ceiling rows of removal-only refinement from X's prompts (they use the GT).

``oracle_label(X)``: remove every prompt whose label disagrees with the GT at its node (free: no decoding;
the target of the defender's label-oracle loss). ``oracle_removal(X)``:

Greedy GT-guided deactivation: at each step, remove the active prompt whose removal raises the low-res
Dice (the RL reward, :meth:`ppd.env.prompt_env.PromptEnv.dice_of`) the most, until no removal raises it;
the last positive prompt is never removed. Any removal-only defender started from X is bounded by this
row (up to the greedy order), so tables show it next to ``defense(X)`` / ``feature_matching+ppd``.
"""

from __future__ import annotations

import torch

from ppd.env.prompts import mask_on_grid
from ppd.env.roles import wrong_labels
from ppd.eval.registry import MethodContext, MethodOutput, register_template
from ppd.types import INACTIVE, POSITIVE


def greedy_oracle_removal(env: object, image_id: int, start: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Greedy GT-oracle removal for one image.

    Args:
        env: a :class:`ppd.env.prompt_env.PromptEnv` holding the image and its GT.
        image_id: the image's id in ``env``.
        start: ``(N,)`` start state.

    Returns:
        ``(final state (N,), removals, final low-res Dice)``.
    """
    status = start.long().clone()
    cur = float(env.dice_of(torch.tensor([image_id]), status[None])[0])  # type: ignore[attr-defined]
    removed = 0
    while True:
        active = (status != INACTIVE).nonzero().reshape(-1)
        if int((status == POSITIVE).sum()) == 1:
            active = active[status[active] != POSITIVE]
        if active.numel() == 0:
            break
        trial = status.repeat(active.numel(), 1)
        trial[torch.arange(active.numel()), active] = INACTIVE
        dice = env.dice_of(torch.full((active.numel(),), image_id), trial)  # type: ignore[attr-defined]
        best = int(dice.argmax())
        if not float(dice[best]) > cur:
            break
        status, cur, removed = trial[best], float(dice[best]), removed + 1
    return status, removed, cur


@register_template(
    "oracle_removal",
    output="state",
    description="ceiling: greedy GT-guided removal from X's prompts (low-res Dice, keeps the last positive)",
)
def oracle_removal(ctx: MethodContext, stems: list[str], source: str) -> dict[str, MethodOutput]:
    """Greedy GT-oracle removal from ``source``'s prompts."""
    start = ctx.state(source, stems)
    out = {}
    for s in stems:
        st, n, d = greedy_oracle_removal(ctx.env, ctx.sid[s], start[s])
        out[s] = MethodOutput(status=st, extra={"removed": n, "low_res_dice": d})
    return out


def label_oracle_removal(start: torch.Tensor, node_fg: torch.Tensor) -> torch.Tensor:
    """Remove every prompt whose label disagrees with the GT at its node (no decoding).

    The target of the defender's label-oracle margin loss (:func:`ppd.rl.losses.oracle_margin_loss`). When
    every positive is wrong, the wrong positive listed first is kept (SAM needs a positive point).

    Args:
        start: ``(N,)`` start state.
        node_fg: ``(N,)`` bool, GT mask at each node centre.

    Returns:
        ``(N,)`` final state.
    """
    status = start.long().clone()
    wrong = wrong_labels(status, node_fg)
    if bool((status == POSITIVE).any()) and not bool(((status == POSITIVE) & ~wrong).any()):
        wrong[(status == POSITIVE).nonzero()[0, 0]] = False
    status[wrong] = INACTIVE
    return status


@register_template(
    "oracle_label",
    output="state",
    description="ceiling: remove every prompt whose label disagrees with the GT at its node (keeps a positive)",
)
def oracle_label(ctx: MethodContext, stems: list[str], source: str) -> dict[str, MethodOutput]:
    """GT label-oracle removal from ``source``'s prompts."""
    start = ctx.state(source, stems)
    out = {}
    for s in stems:
        fg = mask_on_grid(ctx.gt_mask(s), ctx.grid).reshape(-1)
        st = label_oracle_removal(start[s], fg)
        out[s] = MethodOutput(status=st, extra={"removed": int(((start[s] != 0) & (st == 0)).sum())})
    return out
