"""``ppd.report`` on a synthetic run folder: curves from merged CSV versions, panels, config, eval tables."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppd.report import build_report, main, markdown_to_html, read_metrics


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "quick"
    v0 = run / "csv" / "version_0"
    v1 = run / "csv" / "version_1"  # a resumed run: steps 4.. again, then further
    v0.mkdir(parents=True)
    v1.mkdir(parents=True)
    (v0 / "metrics.csv").write_text(
        "epoch,step,train/td_loss_att,val/defense_gain\n"
        + "".join(f"0,{s},{1.0 / (s + 1)},\n" for s in range(6))
        + "0,5,,0.25\n"
    )
    (v1 / "metrics.csv").write_text(
        "epoch,step,train/td_loss_att,val/defense_gain\n"
        + "".join(f"1,{s},{2.0},\n" for s in range(4, 9))
        + "1,8,,0.5\n"
    )
    (run / "panels").mkdir()
    for ep in (0, 4, 8):
        arr = np.full((30, 40, 3), 30 * ep, dtype=np.uint8)
        Image.fromarray(arr).save(run / "panels" / f"episode_{ep:05d}.png")
    (run / "config.yaml").write_text("model:\n  init_args:\n    lr: 0.001\n")
    (run / "eval").mkdir()
    (run / "eval" / "results.md").write_text("# Table\n\n| method | Dice |\n|---|---|\n| ppd | 0.81 <b> |\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_metrics_merge_and_report_contents(tmp_path: Path) -> None:
    run = _run(tmp_path)
    curves = read_metrics(run)
    assert sorted(curves) == ["train/td_loss_att", "val/defense_gain"]
    loss = curves["train/td_loss_att"]
    assert loss.steps == list(range(9))
    assert loss.values[:4] == [1.0, 0.5, 1 / 3, 0.25] and loss.values[4:] == [2.0] * 5  # version_1 wins
    assert curves["val/defense_gain"].steps == [5, 8]

    index = build_report(run, panels=2)
    out = run / "report"
    assert index == out / "index.html"
    page = index.read_text()
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,([^']+)'", page)
    assert len(imgs) == 2 + 2  # two metric plots + the two latest panels
    for b in imgs:
        Image.open(__import__("io").BytesIO(base64.b64decode(b))).verify()
    assert "episode_00004.png" in page and "episode_00008.png" in page and "episode_00000.png" not in page
    assert "<td>0.81 &lt;b&gt;</td>" in page  # eval table rendered, escaped
    assert "lr: 0.001" in page and "checkpoints/last.ckpt" in page
    md = (out / "report.md").read_text()
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / ref).is_file(), ref
    assert "| ppd | 0.81 <b> |" in md
    # the metric PNG shows a curve: not a blank canvas
    png = np.asarray(Image.open(out / "metric_train_td_loss_att.png").convert("RGB"))
    assert png.std() > 10 and len(np.unique(png.reshape(-1, 3), axis=0)) > 20


def test_report_without_csv_or_panels_still_renders(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    page = build_report(run).read_text()
    assert "No <code>metrics.csv</code>" in page and "No episode panels" in page


def test_report_cli_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])


def test_markdown_subset() -> None:
    h = markdown_to_html("## Title\n\ntext a\ntext b\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n")
    assert "<h4>Title</h4>" in h and "<p>text a text b</p>" in h
    assert "<th>a</th><th>b</th>" in h and "<td>1</td><td>2</td>" in h and "--" not in h
