"""Per-image latency of the one-shot FM variants and of the GF-SAM-style row on cached features (issue 24).

    python experiments/benchmarks/fm_variants.py [--grids 16 32] [--threads 1] [--limit N] [--tiny]

Images: the bundled samples (24 CVC-ClinicDB + 12 PH2); the first image of each data set is the reference.
Timed per image, encoders excluded (features are read from the cache, filled before timing):

- ``fm <variant>``: :func:`ppd.env.prompts.prompts_from_reference` with the variant's recipe
  (:data:`ppd.env.fm_variants.FM_PRESETS`), i.e. pooling, matching and selection, no SAM call;
- ``gf_sam``: :func:`ppd.eval.methods.gf_sam.gf_sam_image`: selection, one MobileSAM decode per selected
  point (``onnx_cached`` decoder, as the evaluation configs), clustering, gating and the upscaled union.

DINOv2 tokens are at ``14 * G`` px (224 for G = 16, 448 for G = 32). Prints the median and p90 in ms and
the mean number of start prompts. The quick start is unaffected by G = 32: its configs keep G = 16 / 224 px
and a 448 px cache lives in its own folder (``dino/dinov2_vits14_448_v2``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.fm_variants import FM_PRESETS, FM_VARIANTS
from ppd.env.prompt_env import build_env
from ppd.env.prompts import prompts_from_reference
from ppd.eval.methods.gf_sam import gf_sam_image

DATASETS = ("examples/data/cvc_clinicdb", "examples/data/ph2")


def _summary(times: list[float]) -> str:
    return (
        f"median {statistics.median(times):7.1f} ms, p90 {sorted(times)[int(0.9 * (len(times) - 1))]:7.1f} ms"
    )


def run_grid(grid: int, a: argparse.Namespace) -> None:
    dino = "tiny" if a.tiny else "dinov2_vits14"
    res = 112 if a.tiny else 14 * grid
    cache = FeatureCache(
        sam_variant="tiny" if a.tiny else "vit_t",
        sam_checkpoint=None if a.tiny else "default",
        dino_name=dino,
        dino_resolution=res,
        dino_pretrained=not a.tiny,
    )
    times: dict[str, list[float]] = {v: [] for v in (*FM_VARIANTS, "gf_sam")}
    prompts: dict[str, list[int]] = {v: [] for v in (*FM_VARIANTS, "gf_sam")}
    env_config = {"grid": grid, "k_feature": 8, "k_physical": 8}
    for root in DATASETS:
        ds = SegmentationFolder(root)
        samples = [ds[i] for i in range(min(len(ds), a.limit + 1))]
        feats = [cache.get(s.image) for s in samples]  # fills the cache (not timed)
        ref = SimpleNamespace(features=feats[0], mask=samples[0].mask)
        env = build_env(
            cache.sam_encoder.sam.eval(),
            feats[1:],
            [s.mask for s in samples[1:]],
            env_config,
            decoder_backend="torch" if a.tiny else "onnx_cached",
        )
        ctx = SimpleNamespace(
            reference=ref,
            grid=grid,
            env=env,
            sid={i: i for i in range(len(feats) - 1)},
            features=lambda i, _f=feats: _f[1 + i],
        )
        gf_sam_image(ctx, 0)  # warm-up: lazy imports, ONNX session, image-side cache
        for i, f in enumerate(feats[1:]):
            for v in FM_VARIANTS:
                t0 = time.perf_counter()
                status, _ = prompts_from_reference(
                    ref.features.dino_tokens, ref.mask, f.dino_tokens, grid, **FM_PRESETS[v]
                )
                times[v].append(1000 * (time.perf_counter() - t0))
                prompts[v].append(int((status > 0).sum()))
            env.image_side(i)  # the decoder's image side is built once per image in every row: not timed
            t0 = time.perf_counter()
            out = gf_sam_image(ctx, i)
            times["gf_sam"].append(1000 * (time.perf_counter() - t0))
            prompts["gf_sam"].append(int(out.extra.get("n_points", 0)))
    n = len(times["gf_sam"])
    for v, t in times.items():
        name = f"fm {v}" if v != "gf_sam" else "gf_sam (row)"
        print(
            f"G={grid:3d} {name:14s}: {n} images, {_summary(t)}; prompts {statistics.fmean(prompts[v]):6.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--limit", type=int, default=10_000, help="target images per data set (after its reference)"
    )
    p.add_argument("--tiny", action="store_true", help="random tiny encoders (no weights needed)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}; features {'tiny random' if a.tiny else 'MobileSAM + DINOv2-S/14'} (cached)")
    for g in a.grids:
        run_grid(g, a)


if __name__ == "__main__":
    main()
