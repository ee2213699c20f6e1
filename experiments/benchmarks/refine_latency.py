"""Defender refinement latency per image with cached features (encoders excluded), for G = 16 and G = 32.

    python experiments/benchmarks/refine_latency.py [--grids 16 32] [--checkpoint defender.pt] [--tiny]

Images: the bundled samples (24 CVC-ClinicDB + 12 PH2 = 36). Start prompts: one-shot feature matching
(:func:`ppd.env.prompts.feature_matching_prompts`, 10 + 10 caps) against the first image of each data set
(the reference is not timed). Timed per image: :meth:`ppd.inference.PromptDefender.refine_status`, i.e.
graph construction from the cached DINOv2 tokens, the greedy Q-guided deactivation loop (stopping rule of
:mod:`ppd.inference`) and the final SAM decode + upscale to the original resolution. The SAM image
embedding and DINOv2 tokens are read from the feature cache, filled before timing.

Without ``--checkpoint`` the defender is a *randomly initialised* QNetwork of the quick-start size
(hidden 64, 2 layers, 2 heads): its stopping decisions are arbitrary, so the number of deactivations per
image is printed too. A random network usually stops at once (best Q <= 0), which times only one
Q-network pass; ``--q-offset X`` adds ``X`` to the random head's output bias so that every Q-value is
positive and the defender keeps removing prompts until ``--max-steps`` (the default run reports both:
offset 0 with no budget, and offset 10 with 10 steps). ``--max-steps`` bounds the deactivations.
DINOv2 tokens are computed at ``14 * G`` pixels (one token per node: 224 for G=16, 448 for G=32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.data.replay import FEATURE_DIMS
from ppd.env.graph import pool_tokens
from ppd.env.prompts import feature_matching_prompts
from ppd.inference import PromptDefender
from ppd.models.qnet import QNetwork

DATASETS = ("examples/data/cvc_clinicdb", "examples/data/ph2")


def run_grid(grid: int, a: argparse.Namespace) -> dict[str, float]:
    """Median/mean refinement latency (ms) and mean steps over all non-reference images for one grid."""
    dino = "tiny" if a.tiny else "dinov2_vits14"
    res = 112 if a.tiny else 14 * grid
    cache = FeatureCache(
        sam_variant="tiny" if a.tiny else "vit_t",
        sam_checkpoint=None if a.tiny else "default",
        dino_name=dino,
        dino_resolution=res,
        dino_pretrained=not a.tiny,
    )
    env_config = {
        "grid": grid,
        "k_feature": 8,
        "k_physical": 8,
        "sam_variant": cache.config.sam_variant,
        "dino_name": dino,
        "dino_resolution": res,
    }
    if a.checkpoint:
        defender = PromptDefender.from_checkpoint(a.checkpoint, cache=cache, max_steps=a.max_steps)
        if defender.grid != grid:
            raise SystemExit(f"--checkpoint has grid {defender.grid}, benchmark asked for {grid}")
    else:
        torch.manual_seed(0)
        qnet = QNetwork(in_dim=FEATURE_DIMS[dino] + 5, hidden=64, layers=2, heads=2, out_per_node=1)
        with torch.no_grad():
            qnet.head[-1].bias += a.q_offset
        defender = PromptDefender(
            qnet, env_config, cache.sam_encoder.sam.eval(), cache, max_steps=a.max_steps
        )
    times, steps = [], []
    t_fill = time.perf_counter()
    jobs = []
    for root in DATASETS:
        ds = SegmentationFolder(root)
        samples = [ds[i] for i in range(len(ds))]
        feats = [cache.get(s.image) for s in samples]  # fills the cache (not timed)
        ref_tokens = pool_tokens(feats[0].dino_tokens, grid)
        for f in feats[1:]:
            status, _ = feature_matching_prompts(
                ref_tokens, samples[0].mask, pool_tokens(f.dino_tokens, grid)
            )
            jobs.append((f, status))
    t_fill = time.perf_counter() - t_fill
    defender.refine_status(*jobs[0])  # warm-up (lazy imports, allocator)
    for f, status in jobs:
        t0 = time.perf_counter()
        out = defender.refine_status(f, status)
        times.append(1000 * (time.perf_counter() - t0))
        steps.append(out.steps)
    return {
        "images": len(jobs),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
        "mean_steps": statistics.fmean(steps),
        "mean_start_prompts": statistics.fmean(float((s > 0).sum()) for _, s in jobs),
        "cache_fill_s": t_fill,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    p.add_argument("--checkpoint", default=None, help="exported defender / training checkpoint (else random)")
    p.add_argument("--max-steps", type=int, default=None, help="defender budget (default: unlimited)")
    p.add_argument("--q-offset", type=float, default=None, help="random defender: add to the Q head bias")
    p.add_argument("--tiny", action="store_true", help="random tiny encoders (no weights needed)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    who = a.checkpoint or "randomly initialised QNetwork (quick-start size: hidden 64, 2 layers, 2 heads)"
    enc = "tiny random encoders" if a.tiny else "MobileSAM + DINOv2-S/14"
    print(f"defender: {who}; features: {enc} (cached, encoders excluded); threads {a.threads}")
    settings = [(a.q_offset, a.max_steps)]
    if a.q_offset is None and not a.checkpoint:
        settings = [(0.0, a.max_steps), (10.0, a.max_steps or 10)]
    for g in a.grids:
        for offset, budget in settings:
            a.q_offset, a.max_steps = offset or 0.0, budget
            r = run_grid(g, a)
            tag = "" if a.checkpoint else f" [Q offset {a.q_offset:g}, max_steps {budget}]"
            print(
                f"G={g:3d}{tag}: {r['images']} images, refine_status median {r['median_ms']:.1f} ms "
                f"(mean {r['mean_ms']:.1f}, p90 {r['p90_ms']:.1f}); start prompts "
                f"{r['mean_start_prompts']:.1f}, deactivations {r['mean_steps']:.2f} per image; "
                f"cache fill {r['cache_fill_s']:.1f} s (not timed)"
            )


if __name__ == "__main__":
    main()
