"""Run the Table I / II evaluation configs and collect their Markdown into ``experiments/results/*.md``.

::

    DATA_ROOT=../shared/data DEFENDER=runs/<run>/checkpoints/last.ckpt \
        python experiments/run_tables.py [--limit N] [--only table1_cvc ...]

Each config writes ``results.{md,csv,json}`` (and its per-method cache) into its ``output_dir``; this
script then copies the Markdown to ``experiments/results/<config name>.md``. Reruns are cheap: finished
(method, data set) pairs are read from the cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("table1_cvc", "table1_ph2", "table2_oneshot")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="images per data set (default: all)")
    p.add_argument("--only", nargs="+", choices=TABLES, default=list(TABLES), help="configs to run")
    a = p.parse_args(argv)
    os.chdir(ROOT)  # the configs use paths relative to the repository
    sys.path.insert(0, str(ROOT))
    from ppd.eval import Evaluator, load_config

    results_dir = ROOT / "experiments" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        cfg = load_config(ROOT / "configs" / "eval" / f"{name}.yaml")
        Evaluator(cfg).run(limit=a.limit)
        src = Path(cfg.output_dir) / "results.md"
        tmp = results_dir / f".{name}.md.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, results_dir / f"{name}.md")
        print(f"{name}: {results_dir / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
