"""Stand-alone SAMPO evaluation (until the evaluation registry lands on main): seeded 3+3 sparse clicks.

Every row decodes the *same* clicks per image (``ppd.data.points.stem_generator(seed, stem)``), drawn
from the GT: ``sam_sparse`` is the un-tuned MobileSAM, the other rows are LoRA adapters merged into it.
Reports mDSC / mIoU with percentile-bootstrap 95% intervals over images and paired Dice differences
against ``sam_sparse`` (bootstrap over images of the per-image difference).

    DATA_ROOT=/work/shared/data PYTHONPATH=. python experiments/sampo_eval.py --name "PH2 val" \
        --root /work/shared/data/ph2 --split /work/shared/data/splits/ph2_val.txt \
        --adapter sampo=runs/sampo_ph2/sampo_ph2/adapter.pt --out experiments/results/sampo_ph2
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppd.baselines.sparse import predict_sparse
from ppd.data.features import FeatureCache, FeatureCacheConfig
from ppd.data.layouts import build_dataset
from ppd.data.points import stem_generator
from ppd.io import atomic_write_text
from ppd.models.lora import apply_adapter, load_adapter
from ppd.models.sam import build_sam


def bootstrap(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``(n,)`` values."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, gt).sum())
    s = float(pred.sum() + gt.sum())
    union = float(np.logical_or(pred, gt).sum())
    return (2 * inter / s if s else 1.0), (inter / union if union else 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--adapter", action="append", default=[], help="ROW=adapter.pt (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points", type=int, nargs=2, default=(3, 3), metavar=("N_POS", "N_NEG"))
    p.add_argument("--single-mask", action="store_true", help="SAM's single-mask output instead of best-of-3")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    base = build_sam("vit_t")
    rows: dict[str, torch.nn.Module] = {"sam_sparse": base}
    adapters: dict[str, Any] = {}
    for spec in a.adapter:
        name, _, path = spec.partition("=")
        ad = load_adapter(path)
        rows[name] = apply_adapter(base, ad, sam_variant="vit_t")
        adapters[name] = {"path": path, "meta": ad.get("meta", {}), "rank": ad["rank"]}
    ds = build_dataset("folder", a.root, split=a.split)
    n = len(ds) if a.limit is None else min(a.limit, len(ds))
    cache = FeatureCache(FeatureCacheConfig())
    dsc: dict[str, list[float]] = {r: [] for r in rows}
    iou: dict[str, list[float]] = {r: [] for r in rows}
    stems = []
    for i in range(n):
        s = ds[i]
        f = cache.get(s.image)
        stems.append(s.stem)
        for r, sam in rows.items():
            g = stem_generator(a.seed, s.stem)  # the same clicks for every row
            pred = predict_sparse(
                sam, f.sam_embedding.float(), f.input_size, f.original_size, s.mask, g, *a.points,
                multimask=not a.single_mask,
            )  # fmt: skip
            d, j = dice_iou(pred.mask, s.mask)
            dsc[r].append(d)
            iou[r].append(j)
    res: dict[str, Any] = {
        "name": a.name,
        "root": a.root,
        "split": a.split,
        "n_images": n,
        "points": list(a.points),
        "multimask": not a.single_mask,
        "seed": a.seed,
        "adapters": adapters,
        "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0},
        "methods": {},
        "paired": [],
        "per_image": {"stems": stems, "dsc": dsc},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for r in rows:
        v, w = np.array(dsc[r]), np.array(iou[r])
        res["methods"][r] = {
            "n": n,
            "mdsc": v.mean(),
            "mdsc_ci": bootstrap(v),
            "miou": w.mean(),
            "miou_ci": bootstrap(w),
        }
    for r in rows:
        if r != "sam_sparse":
            diff = np.array(dsc[r]) - np.array(dsc["sam_sparse"])
            res["paired"].append(
                {"a": r, "b": "sam_sparse", "mean_dsc_diff": diff.mean(), "ci": bootstrap(diff)}
            )
    if "sampo" in rows and "sam_finetuned_sup" in rows:
        diff = np.array(dsc["sampo"]) - np.array(dsc["sam_finetuned_sup"])
        res["paired"].append(
            {"a": "sampo", "b": "sam_finetuned_sup", "mean_dsc_diff": diff.mean(), "ci": bootstrap(diff)}
        )

    out = Path(a.out)
    mode = "best-of-3 multimask (highest predicted IoU)" if not a.single_mask else "single-mask output"
    md = [
        f"# {a.name}",
        "",
        f"{n} images of `{a.root}` (split `{a.split}`), {a.points[0]} positive + {a.points[1]} negative GT clicks "
        f"per image drawn with seed {a.seed} (identical for every row), {mode}. mDSC / mIoU with 95% percentile "
        "bootstrap intervals over images (1000 resamples). Produced by `experiments/sampo_eval.py`.",
        "",
        "| method | n | mDSC [95% CI] | mIoU [95% CI] | adapter |",
        "|---|---|---|---|---|",
    ]
    for r, e in res["methods"].items():
        ad = adapters.get(r, {}).get("path", "– (un-tuned MobileSAM)")
        md.append(
            f"| {r} | {n} | {e['mdsc']:.3f} [{e['mdsc_ci'][0]:.3f}, {e['mdsc_ci'][1]:.3f}] | "
            f"{e['miou']:.3f} [{e['miou_ci'][0]:.3f}, {e['miou_ci'][1]:.3f}] | `{ad}` |"
        )
    md.append("")
    for q in res["paired"]:
        md.append(
            f"Paired mDSC difference `{q['a']}` − `{q['b']}`: {q['mean_dsc_diff']:+.3f} [{q['ci'][0]:+.3f}, {q['ci'][1]:+.3f}]"
        )
    md.append("")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", "\n".join(md))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "method", "n", "mdsc", "mdsc_lo", "mdsc_hi", "miou", "miou_lo", "miou_hi"])
    for r, e in res["methods"].items():
        w.writerow([a.name, r, n, e["mdsc"], *e["mdsc_ci"], e["miou"], *e["miou_ci"]])
    for q in res["paired"]:
        w.writerow([a.name, f"paired:{q['a']} - {q['b']}", n, q["mean_dsc_diff"], *q["ci"], "", "", ""])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
