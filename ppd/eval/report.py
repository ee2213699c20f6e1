"""Report writers of the evaluation harness: Markdown, CSV, JSON (atomic) and a W&B table."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppd.io import atomic_write_text

METRIC_NOTE = (
    "per-image Dice (DSC) and IoU at the original image resolution (torchmetrics), averaged over images"
)


def _fmt(v: float, ci: Sequence[float]) -> str:
    if v != v:  # NaN
        return "–"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def to_markdown(results: dict[str, Any]) -> str:
    """Markdown report of :meth:`ppd.eval.runner.Evaluator.run` results."""
    bs = results["bootstrap"]
    lines = [
        f"# {results['name']}",
        "",
        f"Metrics: {METRIC_NOTE} (mDSC, mIoU); [low, high] = {bs['confidence']:.0%} percentile bootstrap "
        f"interval over images ({bs['resamples']} resamples, seed {bs['seed']}).",
        "",
        f"- defender: `{results['defender']}` (sha256/16 `{results['defender_sha256_16']}`, step budget "
        f"{results['defender_max_steps']}); attacker: `{results['attacker']}` ({results['attack_steps']} steps)",
        f"- grid {results['env'].get('grid')}, SAM `{results['env'].get('sam_variant')}`, DINOv2 "
        f"`{results['env'].get('dino_name')}` at {results['env'].get('dino_resolution')} px; limit {results['limit']}",
        "",
    ]
    for sec in results["datasets"]:
        ref = sec["reference"]
        rule = f"seed {ref['seed']}" if ref["rule"] == "seed" else ref["rule"]
        lines += [
            f"## {sec['dataset']['name']} (n = {sec['n_images']}; one-shot reference `{ref['stem']}` ({rule}), excluded)",
            "",
            "| method | n | mDSC [95% CI] | mIoU [95% CI] | notes |",
            "|---|---|---|---|---|",
        ]
        for m, e in sec["methods"].items():
            if e["skipped"]:
                lines.append(f"| {m} | – | – | – | skipped: {e['skipped']} |")
                continue
            notes = []
            if "mean_defender_steps" in e:
                notes.append(f"mean defender steps {e['mean_defender_steps']:.1f}")
            if "no_positive_images" in e:
                notes.append(f"no positive prompt: {len(e['no_positive_images'])}/{e['n']}")
            lines.append(
                f"| {m} | {e['n']} | {_fmt(e['mdsc'], e['mdsc_ci'])} | {_fmt(e['miou'], e['miou_ci'])} | {'; '.join(notes)} |"
            )
        fm = sec["fm_no_positive"]
        lines += [
            "",
            # union over every row that carries the flag (several FM variants: any of them)
            f"Feature matching (any FM row above) gave no positive prompt on {fm['count']} of {fm['of']} images"
            + (f" ({', '.join(fm['stems'])})." if fm["stems"] else "."),
        ]
        for p in sec["paired"]:
            lines.append(
                f"Paired mDSC difference `{p['a']}` − `{p['b']}`: {p['mean_dsc_diff']:+.3f} "
                f"[{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
            )
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    "dataset",
    "method",
    "n",
    "mdsc",
    "mdsc_lo",
    "mdsc_hi",
    "miou",
    "miou_lo",
    "miou_hi",
    "reference",
    "skipped",
)


def to_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (data set, method), plus ``paired:a-b`` rows (Dice difference in the mDSC columns)."""
    rows = []
    for sec in results["datasets"]:
        name, ref = sec["dataset"]["name"], sec["reference"]["stem"]
        for m, e in sec["methods"].items():
            row = {"dataset": name, "method": m, "reference": ref, "skipped": e["skipped"] or ""}
            if not e["skipped"]:
                row.update(
                    n=e["n"],
                    mdsc=e["mdsc"],
                    mdsc_lo=e["mdsc_ci"][0],
                    mdsc_hi=e["mdsc_ci"][1],
                    miou=e["miou"],
                    miou_lo=e["miou_ci"][0],
                    miou_hi=e["miou_ci"][1],
                )
            rows.append(row)
        for p in sec["paired"]:
            rows.append(
                {
                    "dataset": name,
                    "method": f"paired:{p['a']} - {p['b']}",
                    "n": sec["n_images"],
                    "reference": ref,
                    "mdsc": p["mean_dsc_diff"],
                    "mdsc_lo": p["ci"][0],
                    "mdsc_hi": p["ci"][1],
                    "skipped": "",
                }
            )
    return rows


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write ``results.md``, ``results.csv`` and ``results.json`` atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", to_markdown(results))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(to_rows(results))
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))


def log_wandb(results: dict[str, Any], cfg: Any) -> None:
    """Log the results table to W&B (offline by default)."""
    import wandb

    w = cfg.wandb
    run = wandb.init(
        project=w.get("project", "ppd"),
        mode=w.get("mode", "offline"),
        name=cfg.name,
        dir=str(cfg.output_dir),
        job_type="eval",
        config={
            "defender": cfg.defender,
            "attacker": cfg.attacker,
            "limit": results["limit"],
            "seed": cfg.seed,
        },
    )
    rows = to_rows(results)
    table = wandb.Table(columns=list(CSV_FIELDS), data=[[r.get(c, None) for c in CSV_FIELDS] for r in rows])
    run.log({"eval/results": table})
    run.finish()
