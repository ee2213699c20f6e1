"""Feature-cache benchmark: first pass (encode + store) vs second pass (cache hits) over the same images.

    python experiments/benchmarks/cache.py [--images examples/data/ph2] [--limit 8] [--tiny]

Prints seconds per image of both passes and their ratio (target: second pass >= 20x faster). Uses a fresh
temporary cache folder, real MobileSAM + DINOv2-S/14 unless --tiny.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="examples/data/ph2")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--tiny", action="store_true", help="random tiny encoders (no weights)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = SegmentationFolder(a.images)
    images = [ds[i].image for i in range(min(a.limit, len(ds)))]
    kw = dict(sam_variant="tiny", dino_name="tiny") if a.tiny else {}
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root=root, dino_resolution=a.resolution, **kw)
        _ = cache.sam_encoder, cache.dino  # build (and load weights) outside the timed passes
        t0 = time.perf_counter()
        for im in images:
            cache.get(im)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for im in images:
            cache.get(im)
        second = time.perf_counter() - t0
    n = len(images)
    print(f"images: {n} from {a.images} ({'tiny random' if a.tiny else 'MobileSAM + DINOv2-S/14'} encoders)")
    print(f"first pass (encode + store): {first / n * 1000:.1f} ms/image")
    print(f"second pass (cache hits):    {second / n * 1000:.1f} ms/image")
    print(f"speed-up second/first: {first / second:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
