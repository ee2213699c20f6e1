"""Counterfactual reward generation: decodes/s per decoder lever, reward agreement, 1 vs 2 processes (issue 23).

    python experiments/benchmarks/counterfactual_rewards.py [--images ../shared/data/ph2] [--limit 8]
        [--skip-processes] [--out experiments/results/counterfactual_benchmark.md]

Part 1, levers side by side on the same states: per image an FM start from the next image as reference
(G = 16, 10 + 10), its greedy-oracle successor, and the exact rewards of every removal of both
(:func:`ppd.rl.counterfactual.removal_rewards`), once per decoder lever: eager fp32 torch (reference),
ONNX Runtime (graph optimisation ``all``), ONNX with the image side cached inside the graph, and dynamic
int8 quantisation of both ONNX graphs. Per lever: decodes/s (best of ``--rounds``, levers interleaved per
round so load from other processes hurts them alike), mean and max |Δreward| vs fp32 and the share of
states whose best removal is the same. A lever is kept when mean |Δreward| <= 0.002 and the same best
removal in >= 99% of states.

Part 2, 1 vs 2 processes: the tables of ``--limit`` images written by one ``python -m ppd.counterfactual``
process and by two (``--worker 0/2`` and ``1/2``, started together), each with one thread; prints decodes/s
of both and their ratio. Feature caches must be filled beforehand (``python -m ppd.cache``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.decoders import build_decoder
from ppd.env.prompt_env import PromptEnv
from ppd.env.prompts import prompts_from_reference
from ppd.models.sam import build_sam
from ppd.rl.counterfactual import removal_rewards
from ppd.types import INACTIVE

LEVERS = (
    ("eager fp32 (reference)", "torch", None),
    ("onnx opt=all", "onnx", {}),
    ("onnx + image side in the graph", "onnx_cached", {}),
    ("onnx int8 dynamic", "onnx", {"quantize": True}),
    ("onnx int8 dynamic + image side", "onnx_cached", {"quantize": True}),
)


def _env(sam: torch.nn.Module, feats: list, masks: list, backend: str, onnx_opts: dict | None) -> PromptEnv:
    decoder = build_decoder(sam, backend, **onnx_opts) if onnx_opts else None  # a lever of the ONNX session
    return PromptEnv(sam, feats, masks, grid=16, decoder_backend=backend, decode_chunk=4, decoder=decoder)


def levers(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(1)
    ds = SegmentationFolder(args.images)
    n = min(args.limit, len(ds))
    cache = FeatureCache()
    samples = [ds[i] for i in range(n)]
    feats = [cache.get(s.image) for s in samples]
    masks = [s.mask for s in samples]
    sam = build_sam("vit_t", "default").eval()
    fm = {"metric": "l2", "max_pos": 10, "max_neg": 10, "bidirectional": False}
    starts = torch.stack(
        [
            prompts_from_reference(
                feats[(i + 1) % n].dino_tokens, masks[(i + 1) % n], feats[i].dino_tokens, 16, **fm
            )[0]
            for i in range(n)
        ]
    ).long()
    ids = torch.arange(n)
    ref_env = _env(sam, feats, masks, "torch", None)
    cf0 = removal_rewards(ref_env, ids, starts)
    nxt = starts.clone()
    best = torch.nan_to_num(cf0.rewards, nan=-9).argmax(1)
    nxt[ids, best] = INACTIVE
    states = torch.cat([starts, nxt])
    sid = torch.cat([ids, ids])
    decodes = int(len(sid) + (states != INACTIVE).sum())
    envs = {name: _env(sam, feats, masks, b, o) for name, b, o in LEVERS}
    for e in envs.values():  # warm-up: exports, sessions, image-side caches
        removal_rewards(e, sid[:2], states[:2])
    times: dict[str, float] = {name: float("inf") for name in envs}
    rewards: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, e in envs.items():
            t0 = time.perf_counter()
            rewards[name] = removal_rewards(e, sid, states).rewards
            times[name] = min(times[name], time.perf_counter() - t0)
    ref = rewards[LEVERS[0][0]]
    valid = ~torch.isnan(ref)
    best_ref = torch.nan_to_num(ref, nan=-9).argmax(1)
    lines = [
        f"Part 1: {n} images of {args.images}, {len(sid)} states (FM start + its oracle successor), "
        f"{decodes} decodes per lever, 1 thread, best of {args.rounds} rounds",
        "",
        "| lever | decodes/s | speed vs fp32 | mean abs Δreward | max abs Δreward | same best removal | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in envs:
        d = (rewards[name] - ref)[valid].abs()
        same = float((torch.nan_to_num(rewards[name], nan=-9).argmax(1) == best_ref).float().mean())
        keep = float(d.mean()) <= 0.002 and same >= 0.99
        lines.append(
            f"| {name} | {decodes / times[name]:.1f} | {times[LEVERS[0][0]] / times[name]:.2f}x | "
            f"{float(d.mean()):.5f} | {float(d.max()):.4f} | {same:.1%} | {'yes' if keep else 'no'} |"
        )
    return lines


def processes(args: argparse.Namespace) -> list[str]:
    config = Path(args.config).resolve()
    over = [
        f"data.init_args.train=[{{root: {Path(args.images).resolve()}, kind: folder, limit: {args.limit}}}]"
    ]
    over += ["data.init_args.shard_size=2", "data.init_args.val=null"]
    envv = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = []
    rates = {}
    for count in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "ppd.counterfactual", "--config", str(config), "--quiet"]
            cmd += [*over, f"data.init_args.tables={d}"]
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [*cmd, "--worker", f"{w}/{count}"], env=envv, stdout=subprocess.PIPE, text=True
                )
                for w in range(count)
            ]
            logs = [p.communicate()[0] for p in procs]
            wall = time.perf_counter() - t0
            if any(p.returncode for p in procs):
                raise SystemExit(f"ppd.counterfactual failed: {logs}")
            dec = sum(int(torch.load(f, weights_only=True)["decodes"]) for f in Path(d).glob("shard_*.pt"))
            rates[count] = dec / wall
            out.append(f"| {count} | {dec} | {wall:.1f} | {dec / wall:.1f} |")
    return [
        "",
        f"Part 2: tables of {args.limit} images of {args.images} (``{args.config}`` settings), whole commands",
        "",
        "| processes | decodes | wall s (start-up included) | decodes/s |",
        "|---|---|---|---|",
        *out,
        "",
        f"2 processes / 1 process: {rates[2] / rates[1]:.2f}x",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="../shared/data/ph2")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", default="configs/ppd_defender_cf.yaml")
    p.add_argument("--skip-processes", action="store_true")
    p.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = p.parse_args()
    lines = levers(args)
    if not args.skip_processes:
        lines += processes(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        from ppd.io import atomic_write_text

        atomic_write_text(
            Path(args.out),
            f"# Counterfactual reward generation benchmark\n\n```\n{' '.join(sys.argv)}\n```\n\n{text}\n",
        )


if __name__ == "__main__":
    main()
