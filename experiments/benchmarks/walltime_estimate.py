"""Estimated wall time of a full PPD training from briefly measured per-step costs (issue 10, "Must show").

    python experiments/benchmarks/walltime_estimate.py [--threads 1] [--backend onnx_cached]
        [--configs configs/ppd_paper.yaml configs/ppd_paper_cpu.yaml] [--repeats 3]

Measured here, on this machine:

* SAM decode + Dice per transition (real MobileSAM, ``--backend``, one cached PH2 embedding) at several
  numbers of active prompt points, fitted ``ms = a + b * points`` (the decoder attends over every point);
* one dense learner update (Double-DQN TD loss + backward + Adam; :mod:`experiments.benchmarks.learner_flops`
  on synthetic kNN graphs) at each config's grid / width / depth / replay batch, and at batch 128 for both
  network sizes; its matmul GFLOP (``torch.utils.flop_counter``);
* the acting forward (no grad) on ``envs_per_rank`` states.

The schedule is what :class:`ppd.tasks.ppd.PPDTask` runs: ``max_episodes`` batched episodes of
``envs_per_rank`` (E) images; per phase (attack, then defence) the E budgets ~ U(budget_range) are played in
lockstep, one training step = one batched env step (one transition per live episode) + one update, so a
phase takes ``max(b_1..b_E)`` updates and ``sum(b_i)`` transitions (update-to-data ratio = their quotient).
Attack step t decodes ``k0 + t`` points, defence step t ``k0 + b - t`` (k0 = 20, the ideal 10 + 10); each
phase start decodes its start states once; the greedy attacker roll-out before the defence costs ``max b``
acting forwards and no decodes. Warm start (``warm_start_steps`` random transitions per role) and validation
(``val_limit`` images x (trained attack + random attack + defence steps) every
``check_val_every_n_epoch * batches_per_epoch`` updates) are added. Expectations over budgets by Monte Carlo.
Feature caching (once per image, before training) is not included.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner_flops import make_update, median_seconds, synthetic_graphs, update_gflop  # noqa: E402

from ppd.data.datasets import SegmentationFolder  # noqa: E402
from ppd.data.features import FeatureCache  # noqa: E402
from ppd.env.prompt_env import PromptEnv  # noqa: E402
from ppd.models.qnet_dense import DenseQNetwork  # noqa: E402
from ppd.models.sam import build_sam  # noqa: E402

K0 = 20  # active points of the ideal start (10 positive + 10 negative)
CHANNELS = 384  # DINOv2-S/14


@dataclass
class Schedule:
    """The training-loop sizes of one config that the estimate needs."""

    name: str
    grid: int
    hidden: int
    layers: int
    batch: int
    envs: int
    episodes: int
    budget: tuple[int, int]
    warm: int
    val_limit: int
    val_steps: int
    val_every_updates: int


def read_schedule(path: str) -> Schedule:
    """Sizes from a training YAML (plain YAML read; interpolations are not needed for these keys)."""
    cfg = yaml.safe_load(Path(path).read_text())
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg.get("trainer", {})
    return Schedule(
        name=Path(path).name,
        grid=int(d.get("grid", 16)),
        hidden=int(m.get("hidden", 64)),
        layers=int(m.get("layers", 2)),
        batch=int(d.get("batch_size", 32)),
        envs=int(d.get("envs_per_rank", 4)),
        episodes=int(m["max_episodes"]),
        budget=(int(d["budget_range"][0]), int(d["budget_range"][1])),
        warm=int(d.get("warm_start_steps", 0)),
        val_limit=int(d.get("val_limit") or 64),
        val_steps=2 * int(m.get("val_attack_steps", 10)) + int(m.get("val_defend_steps", 10)),
        val_every_updates=int(d.get("batches_per_epoch", 100)) * int(t.get("check_val_every_n_epoch", 1)),
    )


def decode_cost(backend: str, points: list[int], repeats: int) -> tuple[float, float, list[float]]:
    """Fit ``seconds = a + b * k`` of one decode + Dice with k active points (real MobileSAM)."""
    sample = SegmentationFolder("examples/data/ph2")[0]
    feats = FeatureCache().get(sample.image)
    grid = 24  # 576 nodes: room for 320 active points
    env = PromptEnv(build_sam("vit_t"), [feats], [sample.mask], grid=grid, decoder_backend=backend)
    g = torch.Generator().manual_seed(0)
    ts = []
    for k in points:
        status = torch.zeros(1, grid * grid, dtype=torch.long)
        status[0, torch.randperm(grid * grid, generator=g)[:k]] = torch.randint(1, 3, (k,), generator=g)
        ts.append(median_seconds(lambda s=status: env.dice_of(torch.tensor([0]), s), repeats))
    b, a = np.polyfit(np.asarray(points, float), np.asarray(ts), 1)
    return float(a), float(b), ts


def act_cost(s: Schedule, repeats: int) -> float:
    """Seconds of one acting forward (no grad) on ``envs`` states."""
    graphs = synthetic_graphs(s.grid, 4, CHANNELS)
    net = DenseQNetwork(CHANNELS + 5, hidden=s.hidden, layers=s.layers, heads=2, out_per_node=2)
    ids = torch.arange(s.envs) % 4
    status = torch.zeros(s.envs, s.grid * s.grid, dtype=torch.long)
    with torch.no_grad():
        return median_seconds(lambda: net.forward_dense(graphs, ids, status), repeats)


def expected_counts(s: Schedule, a: float, b: float, draws: int = 20000) -> dict[str, float]:
    """Expected updates, transitions, decodes and decode seconds of the whole run (Monte Carlo)."""
    rng = np.random.default_rng(0)
    lo, hi = s.budget
    bud = rng.integers(lo, hi + 1, size=(draws, s.envs)).astype(float)
    steps = 2 * bud.max(1)  # attack + defence phase, lockstep
    trans = 2 * bud.sum(1)
    # attack: sum_{t=1..b} a + b (k0 + t); defence: sum_{t=1..b} a + b (k0 + b - t); plus the two phase
    # starts (k0 and k0 + b points): 2 a b + b (2 k0 b + b^2) + 2 a + b (2 k0 + b) per image
    dec_s = (2 * a * bud + b * (2 * K0 * bud + bud**2) + 2 * a + b * (2 * K0 + bud)).sum(1)
    per_ep = {"updates": steps.mean(), "transitions": trans.mean(), "decode_s": dec_s.mean()}
    out = {k: v * s.episodes for k, v in per_ep.items()}
    out["decodes"] = out["transitions"] + 2 * s.envs * s.episodes
    mean_decode = out["decode_s"] / out["decodes"]
    warm_s = 2 * s.warm * mean_decode
    n_val = out["updates"] // s.val_every_updates
    val_s = n_val * s.val_limit * (s.val_steps + 3) * (a + b * (K0 + 5))
    out.update(warm_s=warm_s, val_s=val_s, n_val=n_val)
    return out


def fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="onnx_cached", help="PromptEnv decoder_backend used for the decodes")
    p.add_argument("--configs", nargs="+", default=["configs/ppd_paper.yaml", "configs/ppd_paper_cpu.yaml"])
    p.add_argument("--points", type=int, nargs="+", default=[20, 80, 170, 320])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    da, db, ts = decode_cost(a.backend, a.points, a.repeats)
    print(
        f"decode + Dice [{a.backend}, MobileSAM, {a.threads} thread(s)]: "
        + ", ".join(f"{k} points {1000 * t:.0f} ms" for k, t in zip(a.points, ts, strict=True))
        + f"  -> fit {1000 * da:.1f} ms + {1000 * db:.3f} ms/point"
    )
    scheds = [read_schedule(c) for c in a.configs]
    sizes = {(s.grid, s.hidden, s.layers, s.batch) for s in scheds}
    sizes |= {(s.grid, s.hidden, s.layers, 128) for s in scheds}
    upd: dict[tuple[int, int, int, int], tuple[float, float]] = {}
    graphs_of: dict[int, object] = {}
    for size in sorted(sizes):
        grid, hidden, layers, batch = size
        graphs = graphs_of.setdefault(grid, synthetic_graphs(grid, 32, CHANNELS))
        update, loss_backward = make_update(graphs, hidden, layers, batch)
        gflop = update_gflop(loss_backward)
        t = median_seconds(update, a.repeats)
        upd[size] = (t, gflop)
        print(
            f"learner update G={grid} hidden={hidden} layers={layers} batch={batch}: {1000 * t:.0f} ms, "
            f"{gflop:.1f} GFLOP ({gflop / t:.1f} GFLOP/s)"
        )
    for s in scheds:
        t_upd, gflop = upd[(s.grid, s.hidden, s.layers, s.batch)]
        t_act = act_cost(s, a.repeats)
        c = expected_counts(s, da, db)
        learn_s = c["updates"] * t_upd
        act_s = 1.5 * c["updates"] * t_act  # acting each step + greedy attacker roll-out (half the steps)
        total = c["decode_s"] + learn_s + act_s + c["warm_s"] + c["val_s"]
        print(
            f"\n{s.name}: {s.episodes} batched episodes x E={s.envs} images = {s.episodes * s.envs} image-episodes, "
            f"budgets U{s.budget}, G={s.grid}, hidden {s.hidden} x {s.layers} layers, replay batch {s.batch}"
        )
        print(
            f"  {c['transitions'] / 1e3:.0f}k transitions, {c['decodes'] / 1e3:.0f}k decodes, "
            f"{c['updates'] / 1e3:.0f}k updates -> update-to-data {c['updates'] / c['transitions']:.2f} "
            f"updates per transition; {gflop:.1f} GFLOP per update"
        )
        print(
            f"  decode {fmt_h(c['decode_s'])} + learner {fmt_h(learn_s)} ({1000 * t_upd:.0f} ms/update) + "
            f"acting {fmt_h(act_s)} + warm start {fmt_h(c['warm_s'])} + validation {fmt_h(c['val_s'])} "
            f"({int(c['n_val'])} runs)"
        )
        print(f"  estimated wall time of {s.name} on this machine ({a.threads} thread(s)): {fmt_h(total)}")
    print(f"\n(measured in {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
