"""Validation of a PPD attacker/defender pair: trained vs random agents with the same number of actions.

Plain functions of the environment and the agents (:class:`~ppd.rl.agent.DQNAgent`; no Lightning): :class:`ppd.tasks.ppd.PPDTask` logs
their per-image values averaged over the validation set. The defender runs the inference rule
(:func:`ppd.rl.rollout.greedy_defence`), so validation measures what users get.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ppd.env.prompt_env import PromptEnv
from ppd.rl.agent import DQNAgent
from ppd.rl.rollout import greedy_defence, rollout

__all__ = ["adversarial_metrics", "feature_matching_metrics"]


def adversarial_metrics(
    env: PromptEnv,
    attacker: DQNAgent | nn.Module,
    defender: DQNAgent | nn.Module,
    image_ids: Tensor,
    ideal: Tensor,
    attack_steps: int,
    defend_steps: int,
    keep_last_positive: bool,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Attack the ideal prompts, defend the result; random agents with the same action counts as baselines.

    Args:
        env: validation environment.
        attacker: the attacker agent; defender: the defender agent (or bare Q-networks, see
            :func:`~ppd.rl.agent.as_agent`).
        image_ids: ``(B,)``; ideal: ``(B, N)`` ideal prompt states of those images.
        attack_steps: attacker actions per image; defend_steps: the defender's budget.
        keep_last_positive: the inference rule's last-positive protection.
        generator: RNG of the random agents.

    Returns:
        ``val/<name>`` -> ``(B,)`` per-image values.
    """
    att = rollout(env, attacker, "attack", image_ids, ideal, attack_steps)
    rnd_att = rollout(env, None, "attack", image_ids, ideal, att.actions_taken, generator=generator)
    dfn = greedy_defence(env, defender, image_ids, att.status, defend_steps, keep_last_positive)
    defended = env.dice_of(image_ids, dfn.status)
    rnd_def = rollout(env, None, "defend", image_ids, att.status, dfn.steps, generator=generator)
    return {
        "val/ideal_dice": att.start_dice,
        "val/attacked_dice": att.dice,
        "val/attack_drop": att.start_dice - att.dice,
        "val/random_attack_drop": rnd_att.start_dice - rnd_att.dice,
        "val/defended_dice": defended,
        "val/defense_gain": defended - att.dice,
        "val/random_defense_gain": rnd_def.dice - rnd_def.start_dice,
        "val/defender_actions": dfn.steps.float(),
    }


def feature_matching_metrics(
    env: PromptEnv,
    defender: DQNAgent | nn.Module,
    image_ids: Tensor,
    fm_start: Tensor,
    max_steps: int | None,
    keep_last_positive: bool,
) -> dict[str, Tensor]:
    """The defender refining one-shot feature-matching prompts ``fm_start (B, N)`` (the inference setting).

    Returns:
        ``val/fm_dice``, ``val/fm_defended_dice``, ``val/fm_gain``, ``val/fm_defender_actions``: ``(B,)`` each.
    """
    dfn = greedy_defence(env, defender, image_ids, fm_start, max_steps, keep_last_positive)
    fm_dice, fm_def = env.dice_of(image_ids, fm_start), env.dice_of(image_ids, dfn.status)
    return {
        "val/fm_dice": fm_dice,
        "val/fm_defended_dice": fm_def,
        "val/fm_gain": fm_def - fm_dice,
        "val/fm_defender_actions": dfn.steps.float(),
    }
