"""Environment throughput: batched PromptEnv on cached embeddings vs a naive SamPredictor loop.

    python experiments/benchmarks/env_throughput.py [--images examples/data/ph2] [--limit 4] [--steps 20]

Both sides play the same episodes: per image, start from the ideal prompts (10 + 10) and apply the same
sequence of ``--steps`` random attacker activations. The naive side calls ``SamPredictor.set_image`` once
per image (episode) and ``predict`` per step at full resolution, scoring Dice at full resolution; the
env side reads the cached features (cache filled beforehand, as in training) and scores Dice on the
256x256 low-res logits, once with the eager PyTorch decoder and once with the ONNX Runtime one.
Prints transitions/s of all, their ratio (target >= 3x), the env's ms per step
split into decode / Dice / graph+observation, and the reward agreement of the two sides.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from segment_anything import SamPredictor

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.prompt_env import INACTIVE, NEGATIVE, POSITIVE, PromptEnv, dice_score
from ppd.env.prompts import ideal_prompts, status_to_points
from ppd.models.sam import build_sam


def action_plan(start: torch.Tensor, steps: int, seed: int) -> list[tuple[int, int]]:
    """``steps`` random (node, status) activations of inactive nodes."""
    g = torch.Generator().manual_seed(seed)
    free = (start == INACTIVE).nonzero().squeeze(1)
    nodes = free[torch.randperm(len(free), generator=g)[:steps]]
    labels = torch.randint(0, 2, (len(nodes),), generator=g)
    return [(int(n), POSITIVE if int(lab) == 0 else NEGATIVE) for n, lab in zip(nodes, labels, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="examples/data/ph2")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="attacker steps per episode (one image per episode)")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = SegmentationFolder(a.images)
    samples = [ds[i] for i in range(min(a.limit, len(ds)))]
    sam = build_sam("vit_t")
    cache = FeatureCache()
    feats = [cache.get(s.image) for s in samples]  # training reads a filled cache
    masks = [s.mask for s in samples]
    starts = [
        ideal_prompts(m, a.grid, 1, 10, 10, generator=torch.Generator().manual_seed(i))
        for i, m in enumerate(masks)
    ]
    plans = [action_plan(st, a.steps, i) for i, st in enumerate(starts)]

    # --- naive: set_image once per episode, predict per step at full resolution -----------------
    predictor = SamPredictor(sam)
    naive_rewards: list[float] = []
    t0 = time.perf_counter()
    for s, st, plan in zip(samples, starts, plans, strict=True):
        predictor.set_image(s.image)
        status = st.clone()
        gt = torch.as_tensor(s.mask)[None]

        def full_dice(status: torch.Tensor, s=s, gt=gt) -> float:
            pts, lab = status_to_points(status, a.grid, *s.mask.shape)
            m, _, _ = predictor.predict(pts.numpy(), lab.numpy(), multimask_output=False)
            return float(dice_score(torch.as_tensor(m[0])[None], gt)[0])

        d = full_dice(status)
        for node, val in plan:
            status[node] = val
            d2 = full_dice(status)
            naive_rewards.append(-(d2 - d))
            d = d2
    t_naive = time.perf_counter() - t0
    n_trans = sum(len(p) for p in plans)

    # --- env: cached embeddings, batched over the episodes, both decoder backends ------------------
    print(
        f"episodes: {len(samples)} images x {a.steps} steps = {n_trans} transitions (grid {a.grid}, MobileSAM, "
        f"{a.threads} thread(s))"
    )
    print(f"naive SamPredictor loop: {n_trans / t_naive:.2f} transitions/s ({t_naive:.1f} s)")
    naive_r = np.asarray(naive_rewards)
    for backend in ("torch", "onnx"):
        env = PromptEnv(sam, feats, masks, grid=a.grid, decoder_backend=backend)
        if backend == "onnx":  # build the session (and the one-off export) outside the timed loop
            env.low_res_logits(torch.tensor([0]), torch.stack(starts[:1]))
            env.timings = type(env.timings)()
        t0 = time.perf_counter()
        ids = torch.arange(len(samples))
        env.reset(ids, torch.stack(starts), budget=torch.full((len(samples),), a.steps))
        env_rewards = []
        for t in range(a.steps):
            obs_t0 = time.perf_counter()
            env.observe()  # the Q-network input the agent would read
            env.timings.add("observe_call", time.perf_counter() - obs_t0)
            actions = torch.tensor(
                [2 * plans[i][t][0] + (0 if plans[i][t][1] == POSITIVE else 1) for i in range(len(ids))]
            )
            env_rewards.append(env.step_attack(actions).reward)
        t_env = time.perf_counter() - t0
        env_r = torch.stack(env_rewards, 1).reshape(-1).numpy()
        tm = env.timings.seconds
        print(f"PromptEnv [{backend}] (cached): {n_trans / t_env:.2f} transitions/s ({t_env:.1f} s)")
        print(f"  speed-up env[{backend}]/naive: {t_naive / t_env:.2f}x (target >= 3x)")
        split = (
            tm["decode"],
            tm["dice"],
            tm["graph"] + tm["observe"],
            t_env - tm["decode"] - tm["dice"] - tm["graph"] - tm["observe"],
        )
        print(
            "  ms per transition: decode {:.1f}, dice {:.1f}, graph+observation {:.1f}, other {:.1f}".format(
                *(1000 * x / n_trans for x in split)
            )
        )
        sign = np.mean(np.sign(np.round(env_r, 3)) == np.sign(np.round(naive_r, 3)))
        print(
            f"  reward agreement with the full-res naive loop: mean |diff| {np.abs(env_r - naive_r).mean():.4f}, "
            f"same sign (|r|>=1e-3 rounding) {100 * sign:.1f}%"
        )


if __name__ == "__main__":
    main()
