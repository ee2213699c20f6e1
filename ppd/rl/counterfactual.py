"""Counterfactual (all-action) defender rewards and the (state, rewards) tables built from them (issue 23).

A defender state with ``n`` active prompts has ``n`` actions, and SAM can judge every one of them: decoding
the ``n`` "remove i" successors gives the exact one-step reward (low-res ΔDice, the training reward of
:class:`ppd.env.prompt_env.PromptEnv`) of *every* action, not just of the one a DQN happens to take. Each
decode becomes an exact label, the labels are reusable from disk across runs, and their generation runs
apart from (or beside) the learner.

- :func:`removal_rewards`: ``(B, N)`` ΔDice of every valid removal of B states (+ the states' Dice and SAM's
  per-node inputs of the state itself).
- :func:`generate_shard`: the states of a shard of images -- one-shot feature-matching (FM) starts from random
  same-data-set references, optionally randomly perturbed, then a trajectory that follows the greedy
  ΔDice oracle, a random removal (``explore``) or a given defender (``policy``, DAgger-style), labelling
  every visited state.
- :func:`write_tables` / :func:`load_tables`: resumable shards ``shard_XXXXX.pt`` in one folder, each with
  the generation settings, so a table folder is never silently reused for other settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppd.env.prompt_env import PromptEnv
from ppd.io import atomic_torch_save
from ppd.types import INACTIVE, NEGATIVE, POSITIVE

log = logging.getLogger(__name__)

TABLE_FORMAT = "ppd-cf-table-v1"  # rewards (S, N) and SAM inputs (S, N, 3) stored as float16


@dataclass
class Counterfactual:
    """Exact one-step removal rewards of B states.

    Attributes:
        dice: ``(B,)`` low-res Dice of the states.
        rewards: ``(B, N)`` ΔDice of removing node i (``Dice(s - i) - Dice(s)``); NaN where node i is
            inactive (no such action).
        sam: ``(B, N, 3)`` SAM's per-node inputs of the states (:func:`ppd.env.prompt_env.sam_node_features`).
    """

    dice: torch.Tensor
    rewards: torch.Tensor
    sam: torch.Tensor


def removal_successors(status: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every "remove node i" successor of B states.

    Args:
        status: ``(B, N)`` prompt states.

    Returns:
        ``(rows (M,), nodes (M,), successors (M, N))``: the state row and removed node of each of the
        ``M`` = total active prompts successors, in row-major order.
    """
    rows, nodes = (status != INACTIVE).nonzero(as_tuple=True)
    succ = status[rows].clone()
    succ[torch.arange(len(rows)), nodes] = INACTIVE
    return rows, nodes, succ


def removal_rewards(env: PromptEnv, image_ids: torch.Tensor, status: torch.Tensor) -> Counterfactual:
    """The exact reward of every valid defender action of B states (1 + n_active decodes per state).

    The successors go through :meth:`PromptEnv.dice_of` like any environment step (same grouping by prompt
    count, so a reward never depends on which states share a decoder call), hence each entry equals the
    reward :meth:`PromptEnv.step_defend` would return for that action.

    Args:
        env: environment holding the images (its batch state is not touched).
        image_ids: ``(B,)`` image ids of ``env``.
        status: ``(B, N)`` states.

    Returns:
        :class:`Counterfactual`.
    """
    ids = torch.as_tensor(image_ids, dtype=torch.long)
    status = status.long()
    logits = env.low_res_logits(ids, status)
    dice = env.dice_of_logits(ids, logits)
    sam = env.sam_features_of_logits(ids, logits)
    rows, nodes, succ = removal_successors(status)
    rewards = torch.full(status.shape, float("nan"))
    if len(rows):
        rewards[rows, nodes] = env.dice_of(ids[rows], succ) - dice[rows]
    return Counterfactual(dice=dice, rewards=rewards, sam=sam)


def perturb_state(status: torch.Tensor, generator: torch.Generator, max_add: int = 4) -> torch.Tensor:
    """A random perturbation of one state: drop up to a third of its prompts, add up to ``max_add`` random ones.

    Args:
        status: ``(N,)`` state.
        generator: RNG.
        max_add: at most this many random prompts (random label) on inactive nodes.

    Returns:
        ``(N,)`` new state (at least one active prompt if the input had one).
    """
    out = status.clone()
    active = (out != INACTIVE).nonzero().squeeze(1)
    if len(active) > 1:
        k = int(torch.randint(0, len(active) // 3 + 1, (1,), generator=generator))
        drop = active[torch.randperm(len(active), generator=generator)[:k]]
        out[drop] = INACTIVE
    free = (out == INACTIVE).nonzero().squeeze(1)
    k = min(int(torch.randint(0, max_add + 1, (1,), generator=generator)), len(free))
    add = free[torch.randperm(len(free), generator=generator)[:k]]
    out[add] = torch.where(
        torch.rand(k, generator=generator) < 0.5, torch.tensor(POSITIVE), torch.tensor(NEGATIVE)
    )
    return out


#: a defender policy for DAgger-style trajectories: ``(image_ids (B,), status (B, N), sam (B, N, 3)) -> (B, N) Q``
Policy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generate_shard(
    env: PromptEnv,
    image_ids: torch.Tensor,
    starts: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    generator: torch.Generator,
    references_per_image: int = 2,
    steps: int = 4,
    explore: float = 0.3,
    perturb: float = 0.25,
    policy: Policy | None = None,
    policy_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Labelled states of some images: FM starts and the trajectories from them.

    Per image and reference: an FM start (``starts``), perturbed with probability ``perturb``
    (:func:`perturb_state`); then up to ``steps`` removals, each the greedy oracle's best (largest exact
    ΔDice), a uniformly random valid removal (probability ``explore``) or the ``policy``'s argmax
    (probability ``policy_weight``). Every visited state with an active prompt is labelled by
    :func:`removal_rewards`; a trajectory ends when one prompt is left.

    Args:
        env: environment holding the images.
        image_ids: ``(I,)`` image ids.
        starts: ``(image_ids (B,), generator) -> (B, N)`` start states (e.g. FM from a random reference).
        generator: RNG of references, perturbations and exploration.
        references_per_image: start states per image.
        steps: removals per trajectory (``steps + 1`` labelled states at most).
        explore: probability of a random removal instead of the oracle's.
        perturb: probability that a start state is perturbed.
        policy: defender Q-values for DAgger-style trajectories (optional).
        policy_weight: probability of following ``policy``.

    Returns:
        ``{"image_ids": (S,), "status": (S, N) int8, "rewards": (S, N) float32, "dice": (S,),
        "sam": (S, N, 3) float16, "step": (S,) int8}``.
    """
    ids = torch.as_tensor(image_ids, dtype=torch.long).repeat_interleave(references_per_image)
    status = starts(ids, generator).long()
    for b in range(len(ids)):
        if float(torch.rand(1, generator=generator)) < perturb:
            status[b] = perturb_state(status[b], generator)
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("image_ids", "status", "rewards", "dice", "sam", "step")
    }
    live = (status != INACTIVE).any(1)
    for t in range(steps + 1):
        idx = live.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        cf = removal_rewards(env, ids[idx], status[idx])
        out["image_ids"].append(ids[idx])
        out["status"].append(status[idx].to(torch.int8))
        out["rewards"].append(cf.rewards.half())
        out["dice"].append(cf.dice)
        out["sam"].append(cf.sam.half())
        out["step"].append(torch.full((len(idx),), t, dtype=torch.int8))
        if t == steps:
            break
        q_pol = policy(ids[idx], status[idx], cf.sam) if policy is not None and policy_weight > 0 else None
        for j, b in enumerate(idx.tolist()):
            r = cf.rewards[j]
            valid = ~torch.isnan(r)
            if int(valid.sum()) <= 1:
                live[b] = False
                continue
            u = float(torch.rand(1, generator=generator))
            if u < explore:
                cand = valid.nonzero().squeeze(1)
                node = int(cand[torch.randint(len(cand), (1,), generator=generator)])
            elif q_pol is not None and u < explore + policy_weight:
                node = int(torch.where(valid, q_pol[j], torch.tensor(float("-inf"))).argmax())
            else:
                node = int(torch.where(valid, r, torch.tensor(float("-inf"))).argmax())
            status[b, node] = INACTIVE
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


# -- tables on disk -----------------------------------------------------------------------------------------
def shard_path(folder: Path, index: int) -> Path:
    """``folder/shard_{index:05d}.pt``."""
    return Path(folder) / f"shard_{index:05d}.pt"


def write_tables(
    folder: str | Path,
    env: PromptEnv,
    stems: Sequence[str],
    starts: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    settings: dict[str, Any],
    seed: int = 0,
    shard_size: int = 32,
    worker: tuple[int, int] = (0, 1),
    progress: bool = True,
    **options: Any,
) -> dict[str, float]:
    """Write the (state, rewards) tables of all images, shard by shard; existing shards are kept (resume).

    Shard ``k`` holds images ``[k * shard_size, (k + 1) * shard_size)`` with its own seed, so the tables do
    not depend on how many workers wrote them. ``worker=(i, n)`` writes only shards ``k % n == i`` (run
    ``n`` processes to share the work).

    Args:
        folder: table folder (created).
        env: environment holding the images, in the order of ``stems``.
        stems: per image id a stable name (data-set prefix + file stem), stored with each state.
        starts: start-state function (see :func:`generate_shard`).
        settings: everything the tables depend on (data, graph, FM, SAM, generation options); stored in each
            shard and compared on reuse.
        seed: base seed.
        shard_size: images per shard.
        worker: ``(index, count)``.
        progress: show a progress bar.
        **options: :func:`generate_shard` options.

    Returns:
        ``{"shards_written", "states", "decodes", "seconds"}`` of this call.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wi, wn = worker
    if not (wn >= 1 and 0 <= wi < wn):
        raise ValueError(f"worker {wi}/{wn}: expected 0 <= index < count")
    n_shards = (len(stems) + shard_size - 1) // shard_size
    todo = [k for k in range(n_shards) if k % wn == wi]
    stats = {"shards_written": 0.0, "states": 0.0, "decodes": 0.0, "seconds": 0.0}
    t0 = time.perf_counter()
    for k in tqdm(todo, desc=f"cf tables {wi}/{wn}", unit="shard", disable=not progress):
        path = shard_path(folder, k)
        if path.is_file():
            check_settings(path, torch.load(path, map_location="cpu", weights_only=True), settings)
            continue
        ids = torch.arange(k * shard_size, min((k + 1) * shard_size, len(stems)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        n_dec = env.timings.calls["decode"]
        tab = generate_shard(env, ids, starts, g, **options)
        payload = {
            "format": TABLE_FORMAT,
            "settings": settings,
            "stems": [stems[int(i)] for i in tab.pop("image_ids")],
            **tab,
            "decodes": int(env.timings.calls["decode"] - n_dec),
        }
        atomic_torch_save(payload, path)
        stats["shards_written"] += 1
        stats["states"] += len(payload["stems"])
        stats["decodes"] += payload["decodes"]
    stats["seconds"] = time.perf_counter() - t0
    return stats


def check_settings(path: Path, payload: Any, settings: dict[str, Any]) -> None:
    """One-line error when a table shard is foreign or was generated with other settings."""
    if not isinstance(payload, dict) or payload.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path} is not a counterfactual table shard ({TABLE_FORMAT})")
    stored = payload.get("settings", {})
    diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if diff:
        raise ValueError(
            f"{path}: generated with other settings ({', '.join(f'{k}={stored.get(k)!r}' for k in diff[:3])}; "
            f"now {', '.join(f'{k}={settings.get(k)!r}' for k in diff[:3])}); use another tables folder"
        )


def load_tables(
    folder: str | Path, settings: dict[str, Any], stems: Sequence[str]
) -> dict[str, torch.Tensor]:
    """All shards of a table folder as one table, image names mapped to ids of ``stems``.

    Args:
        folder: table folder.
        settings: expected settings (see :func:`write_tables`).
        stems: image names of the current image pool (ids = positions).

    Returns:
        ``{"image_ids": (S,), "status": (S, N) long, "rewards": (S, N), "dice": (S,), "sam": (S, N, 3),
        "step": (S,), "decodes": int total}``.

    Raises:
        FileNotFoundError: no shard in ``folder``.
        ValueError: a foreign shard, other settings, or a state of an image not in ``stems``.
    """
    folder = Path(folder)
    files = sorted(folder.glob("shard_*.pt"))
    if not files:
        raise FileNotFoundError(f"no counterfactual table shards (shard_*.pt) in {folder}")
    index = {s: i for i, s in enumerate(stems)}
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("image_ids", "status", "rewards", "dice", "sam", "step")
    }
    decodes = 0
    for f in files:
        p = torch.load(f, map_location="cpu", weights_only=True)
        check_settings(f, p, settings)
        missing = [s for s in p["stems"] if s not in index]
        if missing:
            raise ValueError(f"{f}: image {missing[0]!r} is not among the configured training images")
        parts["image_ids"].append(torch.tensor([index[s] for s in p["stems"]], dtype=torch.long))
        for k in ("status", "rewards", "dice", "sam", "step"):
            parts[k].append(p[k])
        decodes += int(p["decodes"])
    out: dict[str, Any] = {k: torch.cat(v) for k, v in parts.items()}
    out["status"] = out["status"].long()
    out["sam"] = out["sam"].float()
    out["rewards"] = out["rewards"].float()
    out["decodes"] = decodes
    return out
