"""``python -m ppd.evaluate --config configs/eval/X.yaml [--limit N]``: methods x data sets -> mDSC / mIoU tables.

Outputs (written atomically) under ``output_dir``: ``results.md``, ``results.csv``, ``results.json`` and,
when ``wandb.enabled``, a W&B table. ``--list`` prints the registered methods.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ppd.eval.config import EvalConfig, load_config
from ppd.eval.registry import describe_methods
from ppd.eval.report import to_markdown
from ppd.eval.runner import Evaluator


def main(
    argv: list[str] | None = None, evaluator_factory: Callable[[EvalConfig], Evaluator] | None = None
) -> int:
    """Entry point; returns the exit code (2 with a one-line message for a bad config or input file)."""
    from ppd.quiet import quiet_known_warnings

    quiet_known_warnings()
    p = argparse.ArgumentParser(prog="python -m ppd.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="evaluation YAML (configs/eval/*.yaml)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images per data set")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument(
        "--defender",
        default=None,
        help="defender of the config's defender rows: 'pretrained' (shipped with ppd), a file or a checkpoint "
        "(same as the override defender=...)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/tmp/x seed=1")
    a = p.parse_args(argv)
    if a.list:
        for name, desc in describe_methods():
            print(f"{name:28s} {desc}")
        return 0
    if not a.config:
        p.error("--config is required (or --list)")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        overrides = list(a.overrides) + ([f"defender={a.defender}"] if a.defender else [])
        cfg = load_config(a.config, overrides)
        ev = evaluator_factory(cfg) if evaluator_factory else Evaluator(cfg, progress=not a.quiet)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = ev.run(limit=a.limit)
    print(to_markdown(results))
    print(f"wrote {Path(cfg.output_dir) / 'results.md'} (+ .csv, .json) in {results['seconds']:.1f} s")
    return 0
