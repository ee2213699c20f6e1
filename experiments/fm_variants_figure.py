"""Figure of issue 24: the same images' one-shot prompts under each FM variant, per data set.

    python experiments/fm_variants_figure.py [--results experiments/results/fm_val_g16] [--out docs/figures]

Reads the prompt states the evaluation stored in its result cache (``configs/eval/fm_val.yaml``), so the
figure shows exactly what the tables measured; SAM's mask of each state is decoded from the cached image
embedding (MobileSAM). For each data set, two images (the first and the middle evaluated stem) x four
variants (``nearest`` = ``feature_matching``, ``paper``, ``mutual``, ``gfsam``): positives are green stars,
negatives red crosses, SAM's mask yellow, the GT dashed cyan; the title gives the image's Dice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.prompts import status_to_points
from ppd.eval.cache import status_from_code
from ppd.models.sam import decode, to_input_frame, upscale_logits
from ppd.viz import draw_prompts, plt

ROWS = {
    "feature_matching": "nearest (ours, 10+10)",
    "fm_paper": "paper",
    "fm_mutual": "mutual",
    "fm_gfsam": "gfsam",
}


def _records(results: Path, method: str, dataset: str) -> dict:
    (path,) = (results / "cache").glob(f"{method}__{dataset}__*.json")
    return json.loads(path.read_text())["records"]


def _mask(cache: FeatureCache, image: np.ndarray, points: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    f = cache.get(image)
    if points.numel() == 0:
        return np.zeros(f.original_size, bool)
    pts = to_input_frame(points[None].float(), f.original_size)
    with torch.inference_mode():
        logits, _ = decode(cache.sam_encoder.sam, f.sam_embedding.float()[None], pts, labels[None].long())
    return (upscale_logits(logits[:, :1].float(), f.input_size, f.original_size)[0, 0] > 0).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="experiments/results/fm_val_g16")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--grid", type=int, default=16)
    a = p.parse_args()
    results, out = Path(a.results), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache()
    for dataset in ("cvc_clinicdb", "ph2"):
        ds = SegmentationFolder(Path(a.data) / dataset)
        recs = {m: _records(results, m, dataset) for m in ROWS}
        stems = list(recs["feature_matching"])  # in evaluation order
        picks = [stems[0], stems[len(stems) // 2]]
        fig, axes = plt.subplots(len(picks), len(ROWS), figsize=(3.2 * len(ROWS), 3.0 * len(picks)))
        for r, stem in enumerate(picks):
            sample = ds[ds.index(stem)]
            h, w = sample.mask.shape
            for c, (method, label) in enumerate(ROWS.items()):
                status = status_from_code(recs[method][stem]["status"])
                pts, lab = status_to_points(status, a.grid, h, w)
                pred = _mask(cache, sample.image, pts, lab)
                inter, tot = np.logical_and(pred, sample.mask).sum(), pred.sum() + sample.mask.sum()
                dice = 1.0 if tot == 0 else 2 * inter / tot
                title = f"{label}: {int((lab == 1).sum())}+ / {int((lab == 0).sum())}-, Dice {dice:.2f}"
                draw_prompts(
                    axes[r, c], sample.image, pred, pts.numpy(), lab.numpy(), title=title, gt=sample.mask
                )
        fig.suptitle(
            f"{dataset} val, G = {a.grid}: one-shot FM variants (images {', '.join(picks)})", fontsize=10
        )
        fig.tight_layout()
        path = out / f"fm_variants_{dataset}_g{a.grid}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=80)
        tmp.replace(path)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
