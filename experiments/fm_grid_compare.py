"""Issue 24: paired per-image mDSC difference of every FM row between two evaluation runs (G = 32 vs G = 16).

The two runs must cover the same data sets with the same one-shot reference; rows present in both are
compared over the images both evaluated (bootstrap as the harness: ``ppd.eval.stats.paired_difference``).

    python experiments/fm_grid_compare.py experiments/results/fm_val_g32 experiments/results/fm_val_g16 \
        --out experiments/results/fm_val_g32/vs_g16.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppd.eval.stats import paired_difference
from ppd.io import atomic_write_text


def load(run: Path) -> dict:
    """``results.json`` of an evaluation output folder."""
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (expected the results.json of a ppd.evaluate run)")
    return json.loads(path.read_text())


def compare(a: dict, b: dict, labels: tuple[str, str], resamples: int = 1000, seed: int = 0) -> list[str]:
    """Markdown lines: per data set, every row of both runs, ``a - b`` with its 95% interval.

    ``labels`` name the runs in the heading (a, b); ``a`` / ``b`` are ``results.json`` contents.
    """
    lines = [
        f"# Paired per-image mDSC: a = `{labels[0]}`, b = `{labels[1]}`",
        "",
        f"`python experiments/fm_grid_compare.py {labels[0]} {labels[1]}`; 95% percentile bootstrap over images "
        f"({resamples} resamples, seed {seed}).",
        "",
    ]
    bsets = {d["dataset"]["name"]: d for d in b["datasets"]}
    for da in a["datasets"]:
        name = da["dataset"]["name"]
        db = bsets.get(name)
        if db is None:
            continue
        if da["reference"] != db["reference"]:
            raise SystemExit(
                f"{name}: the runs use different references ({da['reference']} vs {db['reference']})"
            )
        lines += [f"## {name}", "", "| row | n | a | b | a − b [95% CI] |", "|---|---|---|---|---|"]
        for row, ea in da["methods"].items():
            eb = db["methods"].get(row)
            if eb is None:
                continue
            stems = [s for s in ea["per_image"] if s in eb["per_image"]]
            va = [ea["per_image"][s]["dice"] for s in stems]
            vb = [eb["per_image"][s]["dice"] for s in stems]
            mean, (lo, hi) = paired_difference(va, vb, resamples=resamples, seed=seed)
            lines.append(
                f"| {row} | {len(stems)} | {sum(va) / len(va):.3f} | {sum(vb) / len(vb):.3f} | "
                f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
            )
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="output folder of run a (e.g. G = 32)")
    p.add_argument("b", type=Path, help="output folder of run b (e.g. G = 16)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown here (atomically)")
    args = p.parse_args()
    text = "\n".join(compare(load(args.a), load(args.b), (str(args.a), str(args.b)))) + "\n"
    if args.out is not None:
        atomic_write_text(args.out, text)
    print(text, end="")


if __name__ == "__main__":
    main()
