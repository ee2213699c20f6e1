"""Evaluation tables as W&B tables, offline: the run files hold the table with the CSV's rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ppd.wandb_tables import log_eval_tables, main, read_results

ROOT = Path(__file__).resolve().parents[2]


def test_read_results_parses_numbers(tmp_path: Path) -> None:
    d = tmp_path / "table1_x"
    d.mkdir()
    (d / "results.csv").write_text("dataset,method,n,mdsc,skipped\ncvc,ideal,203,0.70,\ncvc,ppd,203,0.81,\n")
    key, cols, rows = read_results(d)
    assert key == "eval/table1_x" and cols == ["dataset", "method", "n", "mdsc", "skipped"]
    assert rows == [["cvc", "ideal", 203, 0.70, None], ["cvc", "ppd", 203, 0.81, None]]


def test_offline_run_holds_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    src = ROOT / "experiments" / "results" / "table1_cvc"
    res = tmp_path / "table1_cvc"
    shutil.copytree(src, res)
    run_dir = Path(log_eval_tables([res], project="ppd-tests", group="quickstart", save_dir=str(tmp_path)))
    tables = list((run_dir / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 1, tables
    t = json.loads(tables[0].read_text())
    _, cols, rows = read_results(res)
    assert t["columns"] == cols and len(t["data"]) == len(rows)
    assert t["data"][0][:2] == rows[0][:2]


def test_cli_rejects_a_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
