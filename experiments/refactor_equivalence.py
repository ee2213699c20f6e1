"""Behaviour fingerprint of PPD training and evaluation, to show that a refactor changes nothing (issue 25).

    python experiments/refactor_equivalence.py --out experiments/results/refactor_equivalence/before.json
    python experiments/refactor_equivalence.py --out .../after.json
    python experiments/refactor_equivalence.py --compare .../before.json .../after.json [--md out.md]

Runs (each with a fixed seed, from the code of the checkout it is started in):

* ``quickstart``: ``configs/quickstart.yaml`` (real MobileSAM + DINOv2 features) for ``--steps`` optimiser steps
  with validation after every epoch;
* ``levers``: ``tests/conf/tiny_ppd.yaml`` (tiny random models) with the defence-start mixture (greedy, epsilon,
  random, feature matching), ``defend_budget: active``, the oracle margin loss, ``updates_per_step: 2`` and
  the FM part of validation;
* ``pyg``: the tiny config with ``qnet_impl: pyg`` (the PyG reference learner).

For each run it records every training step's counters (env steps, transitions, gradient steps, episode, phase)
and the logged training scalars (TD losses, mean Q, epsilon, Dice drop / gain, margin loss; timings are left
out), the validation scalars, a sha256 of every network parameter and replay-buffer tensor at the end, and the
attacker's and defender's Q-values on a fixed batch of states (the training env's ideal prompts plus seeded
random activations, through the exported networks ``ppd.export.load_attacker`` / ``load_defender``). For the
quick-start run it also evaluates the final checkpoint with ``configs/eval/quickstart.yaml`` (every row, per
image Dice). ``--compare`` reports, per quantity, whether it is bit-identical and else the max abs difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

SKIP = ("train/env_steps_per_s", "train/step_seconds")
RUNS: dict[str, tuple[str, list[str]]] = {
    "quickstart": (
        "configs/quickstart.yaml",
        ["--trainer.check_val_every_n_epoch=1", "--data.init_args.batches_per_epoch=24"],
    ),
    "levers": (
        "tests/conf/tiny_ppd.yaml",
        [
            "--model.init_args.defence_starts={greedy: 1, epsilon: 1, random: 1, feature_matching: 1}",
            "--model.init_args.defend_budget=active",
            "--model.init_args.oracle_margin_weight=0.5",
            "--model.init_args.updates_per_step=2",
            "--model.init_args.val_feature_matching=true",
        ],
    ),
    "pyg": ("tests/conf/tiny_ppd.yaml", ["--model.init_args.qnet_impl=pyg"]),
}


class Recorder(L.Callback):
    """Counters and logged scalars after every training step; validation scalars after every epoch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        row: dict[str, Any] = {
            k: float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("train/") and k not in SKIP
        }
        for name in ("env_steps", "transitions", "episode", "phase"):
            row[name] = getattr(pl_module, name, None)
        row["grad_steps"] = dict(pl_module.grad_steps)
        self.steps.append(row)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.val.append(
            {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        )


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def fixed_states(dm: Any, n: int = 16, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image ids (n,), status (n, N))``: ideal prompts plus seeded random extra activations."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % len(dm.env)
    status = dm.ideal[ids].clone().long()
    extra = (torch.rand(status.shape, generator=g) < 0.1) & (status == 0)
    status[extra] = torch.randint(1, 3, (int(extra.sum()),), generator=g)
    return ids, status


def run_one(name: str, steps: int, work: Path) -> dict[str, Any]:
    """Train one run, record it, save its checkpoint to ``work/<name>.ckpt``."""
    from ppd.export import load_attacker, load_defender
    from ppd.fit import build_cli

    config, extra = RUNS[name]
    os.environ["PPD_RUNS"] = str(work)
    args = [
        "--config",
        config,
        *extra,
        f"--run_name={name}",
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.image_log_every=0",
    ]
    cli = build_cli(args)
    rec = Recorder()
    cli.trainer.callbacks.append(rec)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - t0
    ckpt = work / f"{name}.ckpt"
    cli.trainer.save_checkpoint(str(ckpt))
    model, dm = cli.model, cli.datamodule
    params = {k: _sha(v) for k, v in sorted(model.state_dict().items())}
    buffers = {}
    for role, buf in sorted(model.actor.buffers.items()):
        buffers[role] = {k: _sha(v) for k, v in sorted(buf.state_dict().items())}
    ids, status = fixed_states(dm)
    env = dm.env
    extra_in = None
    att, _ = load_attacker(ckpt)
    dfd, _ = load_defender(ckpt)
    with torch.no_grad():
        obs = env.observe(ids, status, extra_in)
        q_att = att.online(obs.x, obs.edge_index, obs.edge_attr, obs.edge_type).reshape(len(ids), -1)
        q_def = dfd.online(obs.x, obs.edge_index, obs.edge_attr, obs.edge_type).reshape(len(ids), -1)
    return {
        "config": config,
        "args": args,
        "seconds": seconds,
        "steps": rec.steps,
        "val": rec.val,
        "params_sha": params,
        "buffers": buffers,
        "q_att": q_att.tolist(),
        "q_def": q_def.tolist(),
        "checkpoint": str(ckpt),
    }


def evaluate(ckpt: Path, work: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """Per-image Dice of every row of ``configs/eval/quickstart.yaml`` with ``ckpt`` as defender and attacker."""
    out = work / "eval"
    cmd = [sys.executable, "-m", "ppd.evaluate", "--config", "configs/eval/quickstart.yaml"]
    if limit:
        cmd += ["--limit", str(limit)]
    cmd += [f"defender={ckpt}", f"attacker={ckpt}", f"output_dir={out}"]
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    rows: dict[str, dict[str, float]] = {}
    for ds in res["datasets"]:
        for method, r in ds["methods"].items():
            rows[f"{ds['dataset']['name']}/{method}"] = {
                s: v["dice"] for s, v in (r.get("per_image") or {}).items()
            }
    return rows


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: x}


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, float]]:
    """Per top-level quantity: ``(name, verdict, max abs diff)``."""
    rows = []
    for run in sorted(set(a["runs"]) | set(b["runs"])):
        ra, rb = a["runs"].get(run), b["runs"].get(run)
        if ra is None or rb is None:
            rows.append((run, "missing in one file", math.nan))
            continue
        for key in ("steps", "val", "params_sha", "buffers", "q_att", "q_def"):
            fa, fb = _flatten(ra.get(key)), _flatten(rb.get(key))
            if set(fa) != set(fb):
                rows.append((f"{run}/{key}", f"different keys: {sorted(set(fa) ^ set(fb))[:4]}", math.nan))
                continue
            diff, same = 0.0, True
            for k in fa:
                va, vb = fa[k], fb[k]
                if va != vb and not (
                    isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb)
                ):
                    same = False
                    if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                        diff = max(diff, abs(float(va) - float(vb)))
                    else:
                        diff = math.inf
            rows.append((f"{run}/{key}", "bit-identical" if same else "differs", 0.0 if same else diff))
    ea, eb = a.get("eval") or {}, b.get("eval") or {}
    for row in sorted(set(ea) | set(eb)):
        fa, fb = ea.get(row, {}), eb.get(row, {})
        if set(fa) != set(fb):
            rows.append((f"eval/{row}", "different images", math.nan))
            continue
        d = max((abs(fa[s] - fb[s]) for s in fa), default=0.0)
        rows.append((f"eval/{row} ({len(fa)} images)", "bit-identical" if d == 0 else "differs", d))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON to write")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of each training run")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--eval-limit", type=int, default=None, help="images of the evaluation (default: all)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--work", default="runs/refactor_equivalence", help="scratch folder (emptied first)")
    p.add_argument("--md", help="with --compare: also write the table as Markdown here")
    a = p.parse_args()
    if a.compare:
        before, after = (json.loads(Path(f).read_text()) for f in a.compare)
        lines = [
            f"before: `{before.get('commit')}`, after: `{after.get('commit')}`",
            "",
            "| quantity | verdict | max abs diff |",
            "|---|---|---|",
        ]
        rows = compare(before, after)
        lines += [f"| {n} | {v} | {d:.3g} |" for n, v, d in rows]
        text = "\n".join(lines) + "\n"
        print(text)
        if a.md:
            Path(a.md).write_text(text)
        return 0 if all(v == "bit-identical" for _, v, _ in rows) else 1
    if not a.out:
        p.error("--out is required without --compare")
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {"commit": commit, "steps": a.steps, "runs": {}}
    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    for name in a.runs:
        result["runs"][name] = run_one(name, a.steps, work / name)
        print(f"{name}: {result['runs'][name]['seconds']:.1f} s", file=sys.stderr)
    if "quickstart" in a.runs and not a.no_eval:
        result["eval"] = evaluate(work / "quickstart" / "quickstart.ckpt", work, a.eval_limit)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
