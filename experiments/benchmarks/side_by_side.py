"""End-to-end training throughput of two checkouts, measured side by side (alternating runs, same machine load).

    git worktree add --detach ../ppd_old <old commit>
    python experiments/benchmarks/side_by_side.py --old ../ppd_old --new . [--reps 3] [--steps 24] [--tiny]

Each repetition runs ``experiments/benchmarks/train_throughput.py --skip-learner --skip-reference-e2e`` (the
end-to-end part: ``Trainer(max_steps=S)`` on ``configs/quickstart.yaml``, dense learner) once in the old and
once in the new checkout, each with its own code and its own copy of the script, alternating which goes first.
Prints transitions/s of both per repetition, their ratio (new / old) and the median ratio; with ``--out`` also
writes them as Markdown.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

RATE = re.compile(r"\[end to end, dense\].*?: ([0-9.]+) transitions/s")


def run(checkout: Path, args: list[str], scratch: Path) -> float:
    """Transitions/s of one end-to-end run in ``checkout``."""
    env = {**os.environ, "PPD_RUNS": str(scratch), "TMPDIR": str(scratch), "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = str(checkout)
    cmd = [
        sys.executable,
        "experiments/benchmarks/train_throughput.py",
        "--skip-learner",
        "--skip-reference-e2e",
    ]
    out = subprocess.run(cmd + args, cwd=checkout, env=env, capture_output=True, text=True)
    m = RATE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"{checkout}: run failed\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return float(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="checkout of the old commit")
    p.add_argument("--new", default=".", help="checkout of the new commit")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=24, help="end-to-end training steps per run")
    p.add_argument("--tiny", action="store_true", help="random tiny encoders (less decode-bound)")
    p.add_argument("--scratch", default="runs/side_by_side", help="run folders (PPD_RUNS, TMPDIR)")
    p.add_argument("--out", help="also write the table here (Markdown)")
    a = p.parse_args()
    old, new = Path(a.old).resolve(), Path(a.new).resolve()
    scratch = Path(a.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    args = ["--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
    commits = {
        k: subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=d, capture_output=True, text=True
        ).stdout.strip()
        for k, d in (("old", old), ("new", new))
    }
    lines = [
        f"old `{commits['old']}` vs new `{commits['new']}`: end-to-end transitions/s, quick-start config"
        f"{' (tiny encoders)' if a.tiny else ''}, {a.steps} training steps per run, alternating runs",
        "",
        "| rep | old | new | new / old |",
        "|---|---|---|---|",
    ]
    ratios = []
    for rep in range(a.reps):
        order = [("old", old), ("new", new)] if rep % 2 == 0 else [("new", new), ("old", old)]
        rates = {k: run(d, args, scratch) for k, d in order}
        ratios.append(rates["new"] / rates["old"])
        lines.append(f"| {rep} | {rates['old']:.2f} | {rates['new']:.2f} | {ratios[-1]:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", f"median ratio new / old: {statistics.median(ratios):.3f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
