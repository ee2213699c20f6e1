"""Collect the Proxy Prompt ablation (support size K, 16 vs all training images) into one Markdown table.

    python experiments/proxy_prompt_ablation.py experiments/results/proxy_prompt_ph2 \
        experiments/results/proxy_prompt_ph2_k4 experiments/results/proxy_prompt_ph2_all ... \
        --out experiments/results/proxy_prompt_ablation.md

Each argument is the ``output_dir`` of one ``python -m ppd.evaluate`` run (its ``results.json``); the
``proxy_prompt`` / ``proxy_prompt_untrained`` rows of every data set are listed with their mDSC and 95 %
bootstrap CI, the checkpoint and the support options recorded in the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppd.io import atomic_write_text

ROWS = ("proxy_prompt_untrained", "proxy_prompt")


def _fmt(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="eval output_dirs holding results.json")
    p.add_argument("--out", required=True)
    p.add_argument("--note", action="append", default=[], help="run label: DIR=text (e.g. training schedule)")
    a = p.parse_args()
    notes = dict(n.split("=", 1) for n in a.note)
    lines = [
        "# Proxy Prompt ablation: support size K and number of training images",
        "",
        "Per-image Dice (DSC) / IoU at the original resolution, mean over the evaluated images with 95 % "
        "bootstrap CIs (1000 resamples), from `python -m ppd.evaluate` runs listed below.",
        "",
        "| data set | run | row | n | mDSC [95% CI] | mIoU [95% CI] |",
        "|---|---|---|---:|---|---|",
    ]
    for run in a.runs:
        res = json.loads((Path(run) / "results.json").read_text())
        label = notes.get(run, Path(run).name)
        for sec in res["datasets"]:
            d = sec["dataset"]
            ds = d.get("name", d) if isinstance(d, dict) else d
            for row in ROWS:
                m = sec["methods"].get(row)
                if not m or m.get("skipped"):
                    continue
                lines.append(
                    f"| {ds} | {label} | {row} | {m['n']} | {_fmt(m['mdsc'], m['mdsc_ci'])} | "
                    f"{_fmt(m['miou'], m['miou_ci'])} |"
                )
    atomic_write_text(Path(a.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
