"""``python -m ppd.cache --config configs/X.yaml``: fill the feature cache for the data sets of a config.

Accepts a training config (reads ``data.init_args.train`` / ``val`` dataset blocks and
``data.init_args.cache``) or a plain one with top-level ``datasets: [...]`` and ``cache: {...}``.
Command-line overrides use dotted keys: ``python -m ppd.cache --config c.yaml cache.dino_resolution=448``.
``--shard i/n`` encodes only the images ``index % n == i`` of every data set, so ``n`` jobs (e.g. the tasks
of a SLURM array, ``experiments/slurm/cache_array.sbatch``) fill one shared cache between them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields

from omegaconf import OmegaConf

from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCache, FeatureCacheConfig

log = logging.getLogger("ppd.cache")


def configs_from_yaml(path: str, overrides: list[str]) -> tuple[list[DatasetConfig], FeatureCacheConfig]:
    """Read dataset and cache blocks from a fit or cache config (with omegaconf interpolation)."""
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    node = cfg.get("data", {}).get("init_args", cfg) if "data" in cfg else cfg
    blocks = list(node.get("datasets", []) or [])
    for key in ("train", "val"):
        value = node.get(key)
        if value is None:
            continue
        # a training config may list several data sets under one key (ReplayDataModule accepts lists)
        blocks.extend(value if OmegaConf.is_list(value) else [value])
    if not blocks:
        raise ValueError(f"{path}: no data sets found (expected data.init_args.train/val or datasets: [...])")
    names_ds = {f.name for f in fields(DatasetConfig)}
    datasets = []
    for b in blocks:
        # eval-config blocks carry harness-only keys (name, reference): keep the DatasetConfig fields
        d = OmegaConf.to_container(b, resolve=True)
        datasets.append(DatasetConfig(**{k: v for k, v in d.items() if k in names_ds}))
    names = {f.name for f in fields(FeatureCacheConfig)}
    cache_node = node.get("cache")
    cache_dict = dict(OmegaConf.to_container(cache_node, resolve=True)) if cache_node is not None else {}
    env_node = node.get("env") if "datasets" in node else None  # eval configs: encoders live under env:
    if env_node is not None:
        env = OmegaConf.to_container(env_node, resolve=True)
        cache_dict = {**{k: v for k, v in env.items() if k in names}, **cache_dict}
    unknown = set(cache_dict) - names
    if unknown:
        raise ValueError(f"{path}: unknown cache fields {sorted(unknown)}; expected some of {sorted(names)}")
    return datasets, FeatureCacheConfig(**cache_dict)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ValueError: malformed or out of range (one line naming the option).
    """
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
    i, n = int(parts[0]), int(parts[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= INDEX < COUNT")
    return i, n


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m ppd.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (fit config or cache config)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cache.dino_resolution=448")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard", default="0/1", help="INDEX/COUNT: encode only images with index %% COUNT == INDEX"
    )
    args = parser.parse_args(argv)
    try:
        shard, shards = parse_shard(args.shard)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datasets, cache_cfg = configs_from_yaml(args.config, args.overrides)
    cache = FeatureCache(cache_cfg)
    for dcfg in datasets:
        t0 = time.perf_counter()
        stats = cache.ensure(dcfg.build(), progress=not args.quiet, rank=shard, world_size=shards)
        log.info(
            "%s shard %d/%d: %d images, %d hits, %d misses in %.1f s (cache %s)",
            dcfg.root,
            shard,
            shards,
            stats["images"],
            stats["hits"],
            stats["misses"],
            time.perf_counter() - t0,
            cache.root,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
