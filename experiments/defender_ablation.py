"""Collect the counterfactual-defender runs (issue 23) into one Markdown table with bootstrap CIs.

    python experiments/defender_ablation.py --out experiments/results/defender_ablation.md \
        NAME=RUN_DIR:EVAL_DIR [NAME=RUN_DIR:EVAL_DIR ...]

``RUN_DIR`` is a fit's folder (``runs/<run_name>``, its CSV log under ``csv/version_*/metrics.csv`` is read
for the dev curve: ``val/fm_gain`` against ``val/fit_seconds``); ``EVAL_DIR`` holds the ``results.json`` of
``python -m ppd.evaluate`` with the run's exported defender on CVC val / PH2 val (rows ``feature_matching``
and ``feature_matching+ppd``). Per run: the best dev ``val/fm_gain`` (the checkpoint criterion) and when it
was reached, the fit's wall time, then per val set FM + PPD − FM [95% CI] and the mean number of prompts
removed. The dev curves are also written as CSV beside the Markdown file.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ppd.io import atomic_write_text


def dev_curve(run: Path) -> list[tuple[float, int, float]]:
    """``(fit seconds, step, val/fm_gain)`` rows of a run's CSV log (all versions, in order)."""
    rows = []
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            for r in csv.DictReader(fh):
                if r.get("val/fm_gain"):
                    rows.append(
                        (float(r.get("val/fit_seconds") or "nan"), int(r["step"]), float(r["val/fm_gain"]))
                    )
    return rows


def val_rows(eval_dir: Path) -> dict[str, str]:
    """Per data set: ``FM+PPD − FM [CI]`` and the mean number of removed prompts."""
    res = json.loads((eval_dir / "results.json").read_text())
    out = {}
    for ds in res["datasets"]:
        name = ds["dataset"]["name"]
        pair = next(
            (
                p
                for p in ds.get("paired", [])
                if p["a"] == "feature_matching+ppd" and p["b"] == "feature_matching"
            ),
            None,
        )
        m = ds["methods"].get("feature_matching+ppd", {})
        fm = ds["methods"].get("feature_matching", {})
        if pair is None:
            out[name] = "n/a"
            continue
        lo, hi = pair["ci"]
        out[name] = (
            f"{fm.get('mdsc', float('nan')):.3f} → {m.get('mdsc', float('nan')):.3f}: "
            f"{pair['mean_dsc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], removed {m.get('mean_defender_steps', float('nan')):.1f}"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR:EVAL_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="Counterfactual defender ablation (issue 23)")
    a = p.parse_args()
    lines = [
        f"# {a.title}",
        "",
        "FM + PPD − FM: mDSC at original resolution, paired 95% bootstrap CI over images (1000 resamples); "
        "'removed' = mean prompts the defender removed. Dev = `val/fm_gain` on the dev splits "
        "(low-res Dice; the checkpoint criterion), best value and the fit time at which it was reached.",
        "",
        "| run | dev best fm_gain (at s) | fit s | CVC val: FM → FM+PPD, Δ [CI] | PH2 val: FM → FM+PPD, Δ [CI] |",
        "|---|---|---|---|---|",
    ]
    curves = []
    for spec in a.runs:
        name, rest = spec.split("=", 1)
        run, ev = (Path(x) for x in rest.split(":", 1))
        curve = dev_curve(run)
        for t, step, g in curve:
            curves.append(f"{name},{t:.1f},{step},{g:.5f}")
        best = max(curve, key=lambda r: r[2]) if curve else (float("nan"), 0, float("nan"))
        total = max((r[0] for r in curve), default=float("nan"))
        vals = val_rows(ev) if (ev / "results.json").is_file() else {}
        lines.append(
            f"| {name} | {best[2]:+.3f} ({best[0]:.0f}) | {total:.0f} | {vals.get('cvc_clinicdb', 'not run')} | "
            f"{vals.get('ph2', 'not run')} |"
        )
    out = Path(a.out)
    atomic_write_text(out, "\n".join(lines) + "\n")
    atomic_write_text(
        out.with_suffix(".curves.csv"), "run,fit_seconds,step,val_fm_gain\n" + "\n".join(curves) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
