"""``python -m ppd.wandb_tables RESULTS...``: log evaluation tables (``results.csv``) as W&B tables.

Each argument is a results folder written by ``python -m ppd.evaluate`` (``results.csv`` + ``results.json``)
or a ``results.csv`` itself; each becomes one ``wandb.Table`` under ``eval/<folder name>`` in one W&B run
(``job_type="eval"``; give ``--group`` the training run's name to see them beside it). Offline unless
``WANDB_MODE`` says otherwise (``wandb sync`` uploads it later); project / entity from ``--project`` /
``WANDB_PROJECT`` / ``WANDB_ENTITY``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any


def _cell(text: str) -> Any:
    if text == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return text
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def read_results(path: str | Path) -> tuple[str, list[str], list[list[Any]]]:
    """``(key, columns, rows)`` of a results folder or ``results.csv`` (numbers parsed).

    Raises:
        FileNotFoundError: no ``results.csv`` there (the message names the path).
    """
    p = Path(path)
    csv_path = p / "results.csv" if p.is_dir() else p
    if not csv_path.is_file():
        raise FileNotFoundError(f"{path}: no results.csv (expected a ppd.evaluate results folder)")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        columns = next(reader)
        rows = [[_cell(c) for c in r] for r in reader if r]
    return f"eval/{csv_path.parent.name}", columns, rows


def log_eval_tables(
    paths: list[str | Path],
    project: str | None = None,
    name: str | None = None,
    group: str | None = None,
    save_dir: str | None = None,
) -> str:
    """Log every results table to one W&B run; returns the run's local folder."""
    import wandb

    tables = [read_results(p) for p in paths]
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT", "ppd"),
        entity=os.environ.get("WANDB_ENTITY"),
        name=name,
        group=group,
        job_type="eval",
        dir=save_dir,
        mode=os.environ.get("WANDB_MODE", "offline"),
    )
    try:
        run.log({key: wandb.Table(columns=cols, data=rows) for key, cols, rows in tables})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m ppd.wandb_tables", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results folders (or results.csv files) of ppd.evaluate")
    ap.add_argument("--project", default=None)
    ap.add_argument("--name", default=None, help="W&B run name")
    ap.add_argument("--group", default=None, help="W&B group, e.g. the training run's name")
    ap.add_argument("--dir", default=None, help="where the W&B run folder goes (default ./wandb)")
    a = ap.parse_args(argv)
    try:
        for p in a.results:
            read_results(p)  # fail before a W&B run is created
    except FileNotFoundError as e:
        ap.error(str(e))
    print(log_eval_tables(a.results, a.project, a.name, a.group, a.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
