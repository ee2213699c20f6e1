"""The shipped defender on real images with the real packaged weights: Python API and ``ppd.predict``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppd import predict
from ppd.inference import PromptDefender

pytestmark = pytest.mark.slow

PH2 = Path("examples/data/ph2")
REF = "IMD002"
TARGETS = ("IMD017", "IMD045")


def test_predict_with_the_pretrained_defender(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for stem in TARGETS:
        shutil.copy(PH2 / "images" / f"{stem}.jpg", images)
    out = tmp_path / "out"
    ref = [str(PH2 / "images" / f"{REF}.jpg"), str(PH2 / "masks" / f"{REF}.png")]
    args = ["--defender", "pretrained", "--images", str(images), "--reference", *ref, "--out", str(out)]
    assert predict.main([*args, "--quiet"]) == 0
    for stem in TARGETS:
        rec = json.loads((out / f"{stem}.json").read_text())
        assert len(rec["input_points"]) == len(rec["points"]) + len(rec["removed"]) > 0
        assert rec["steps"] == len(rec["removed"])  # removal-only defender: one prompt per step
        assert 1 in rec["labels"]  # the last positive prompt is never removed
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        h, w = np.asarray(Image.open(images / f"{stem}.jpg")).shape[:2]
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255} and rec["mask_pixels"] > 0
        assert (out / f"{stem}_overlay.png").is_file()


def test_from_pretrained_refines_like_the_cli(tmp_path: Path) -> None:
    d = PromptDefender.from_pretrained()
    assert d.max_steps is None and d.keep_last_positive  # the settings stored in the file
    img = np.asarray(Image.open(PH2 / "images" / f"{TARGETS[0]}.jpg").convert("RGB"))
    pts = [[100, 100], [img.shape[1] // 2, img.shape[0] // 2], [10, 10]]
    r1 = d.refine(img, pts, [0, 1, 0])
    r2 = d.refine(img, pts, [0, 1, 0])
    assert r1.points.tolist() == r2.points.tolist() and (r1.mask == r2.mask).all()  # deterministic
    assert 1 in r1.labels.tolist()
