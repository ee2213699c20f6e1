"""``python -m ppd.counterfactual --config configs/X.yaml``: write the counterfactual reward tables of a config.

Reads the ``data`` block of a fit config whose data module is
:class:`ppd.data.counterfactual.CounterfactualDataModule` and writes the missing (state, exact rewards)
shards into its ``tables`` folder (existing shards are kept: the command resumes). ``--worker i/n`` writes
only shards ``k % n == i``, so ``n`` processes (or SLURM array tasks) share the work; ``ppd.fit`` with the
same config then only loads them. Dotted overrides apply to the config, e.g. ``data.init_args.tables=DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from omegaconf import OmegaConf

from ppd.cache import parse_shard
from ppd.data.config import DatasetConfig
from ppd.data.counterfactual import CounterfactualDataModule
from ppd.data.features import FeatureCacheConfig

log = logging.getLogger("ppd.counterfactual")


def datamodule_from_config(path: str, overrides: list[str]) -> CounterfactualDataModule:
    """The :class:`CounterfactualDataModule` of a fit config (``data.init_args``), without Lightning's CLI."""
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    data = cfg.get("data")
    cls = str(data.get("class_path", "")) if data is not None else ""
    if not cls.endswith("CounterfactualDataModule"):
        raise ValueError(
            f"{path}: data.class_path must be ppd.data.counterfactual.CounterfactualDataModule, got {cls!r}"
        )
    args = OmegaConf.to_container(data.get("init_args"), resolve=True)
    for key in ("train", "val"):
        blocks = args.get(key)
        if blocks is None:
            continue
        blocks = blocks if isinstance(blocks, list) else [blocks]
        args[key] = [DatasetConfig(**b) for b in blocks]
    if args.get("cache") is not None:
        args["cache"] = FeatureCacheConfig(**args["cache"])
    return CounterfactualDataModule(**args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m ppd.counterfactual", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="fit config with a CounterfactualDataModule")
    p.add_argument("--worker", default="0/1", help="INDEX/COUNT: write only shards k %% COUNT == INDEX")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.init_args.tables=DIR")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        worker = parse_shard(a.worker)
        dm = datamodule_from_config(a.config, a.overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    stats = dm.write_tables(worker=worker, progress=not a.quiet)
    print(
        f"worker {worker[0]}/{worker[1]}: {int(stats['shards_written'])} shards, {int(stats['states'])} states, "
        f"{int(stats['decodes'])} decodes in {stats['seconds']:.0f} s "
        f"({stats['decodes'] / max(stats['seconds'], 1e-9):.1f} decodes/s); total {time.perf_counter() - t0:.0f} s "
        f"-> {dm.tables}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
