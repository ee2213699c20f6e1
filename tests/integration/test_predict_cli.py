"""``python -m ppd.predict``: outputs, JSON round trip, overwrite protection, unreadable files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppd import predict
from ppd.inference import PromptDefender
from tests.helpers.defender import TINY_ENV, FakeFeatureCache, oracle_decode
from tests.helpers.synthetic import write_folder_dataset


@pytest.fixture
def defender(tiny_sam, monkeypatch) -> PromptDefender:
    from ppd.models.qnet import QNetwork

    monkeypatch.setattr("ppd.env.decoders.decode", oracle_decode)
    torch.manual_seed(0)
    qnet = QNetwork(in_dim=53, hidden=16, layers=1, heads=2)
    return PromptDefender(qnet, dict(TINY_ENV), tiny_sam, FakeFeatureCache(), max_steps=2)


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    root = write_folder_dataset(tmp_path / "data", n=2)
    pts = {
        "0": {"points": [[5, 5], [30, 20], [60, 40]], "labels": [0, 1, 0]},
        "1": {"points": [[32, 24]], "labels": [1]},
    }
    pj = tmp_path / "points.json"
    pj.write_text(json.dumps(pts))
    return root / "images", pj


def test_predict_writes_round_trippable_outputs(tmp_path: Path, defender: PromptDefender) -> None:
    images, pj = _inputs(tmp_path)
    out = tmp_path / "out"
    args = ["--defender", "x.pt", "--images", str(images), "--points", str(pj), "--out", str(out), "--quiet"]
    assert predict.main(args, defender=defender) == 0
    for stem, entry in json.loads(pj.read_text()).items():
        rec = json.loads((out / f"{stem}.json").read_text())
        assert rec["input_points"] == [[float(v) for v in p] for p in entry["points"]]
        assert rec["input_labels"] == entry["labels"]
        image = np.asarray(Image.open(images / f"{stem}.png").convert("RGB"))
        r = defender.refine(image, entry["points"], entry["labels"])  # same defender -> same result
        assert rec["points"] == r.points.tolist() and rec["labels"] == r.labels.tolist()
        assert rec["removed"] == r.removed.tolist() and rec["steps"] == r.steps <= 2
        assert len(rec["points"]) + len(rec["removed"]) == len(
            {tuple(p) for p in r.points.tolist() + r.removed.tolist()}
        )
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert ((mask == 255) == r.mask).all() and rec["mask_pixels"] == int(r.mask.sum())
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.ndim == 3 and overlay.shape[2] == 3 and overlay.std() > 0
    assert not list(out.glob(".*tmp"))


def test_predict_refuses_to_overwrite(tmp_path: Path, defender: PromptDefender, capsys) -> None:
    images, pj = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "1_mask.png").write_bytes(b"keep me")
    args = ["--defender", "x.pt", "--images", str(images), "--points", str(pj), "--out", str(out), "--quiet"]
    assert predict.main(args, defender=defender) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["1_mask.png"]  # nothing written, not even image 0
    assert (out / "1_mask.png").read_bytes() == b"keep me"
    assert predict.main([*args, "--overwrite"], defender=defender) == 0
    assert (out / "1_mask.png").read_bytes() != b"keep me" and (out / "0.json").is_file()


def test_predict_clear_errors(tmp_path: Path, defender: PromptDefender, capsys) -> None:
    images, pj = _inputs(tmp_path)
    out = tmp_path / "out"
    bad = images / "broken.png"
    bad.write_bytes(b"not a png")
    data = json.loads(pj.read_text())
    data["broken"] = {"points": [[1, 1]], "labels": [1]}
    pj.write_text(json.dumps(data))
    args = ["--defender", "x.pt", "--images", str(images), "--points", str(pj), "--out", str(out), "--quiet"]
    assert predict.main(args, defender=defender) == 2  # checked before anything is written
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    del data["broken"]
    data.pop("1")
    pj.write_text(json.dumps(data))
    bad.unlink()
    assert predict.main(args, defender=defender) == 2
    assert "no entry for image '1'" in capsys.readouterr().err


def test_predict_bad_click_writes_nothing(tmp_path: Path, defender: PromptDefender, capsys) -> None:
    """A click outside its image (here the second image's) is one line naming both; no output at all."""
    images, pj = _inputs(tmp_path)
    data = json.loads(pj.read_text())
    data["1"] = {"points": [[32, 24], [70, 10]], "labels": [1, 0]}  # the image is 64 x 48
    pj.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--defender", "x.pt", "--images", str(images), "--points", str(pj), "--out", str(out), "--quiet"]
    assert predict.main(args, defender=defender) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --points: click (70, 10) of image '1' lies outside it (W=64, H=48)"
    assert not out.exists()  # image 0 (valid) was not processed either
    with pytest.raises(SystemExit):
        predict.main([*args, "--max-steps", "-1"], defender=defender)
    assert "--max-steps must be >= 0" in capsys.readouterr().err


def test_predict_unreadable_defender_file(tmp_path: Path, capsys) -> None:
    images, pj = _inputs(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    args = [
        "--defender",
        str(junk),
        "--images",
        str(images),
        "--points",
        str(pj),
        "--out",
        str(tmp_path / "o"),
    ]
    assert predict.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --defender") and "cannot be read as a torch checkpoint" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_predict_with_reference(tmp_path: Path, defender: PromptDefender) -> None:
    root = write_folder_dataset(tmp_path / "data", n=3)
    out = tmp_path / "out"
    args = [
        "--defender",
        "x.pt",
        "--images",
        str(root / "images" / "1.png"),
        str(root / "images" / "2.png"),
        "--reference",
        str(root / "images" / "0.png"),
        str(root / "masks" / "0.png"),
        "--out",
        str(out),
        "--quiet",
    ]
    assert predict.main(args, defender=defender) == 0
    rec = json.loads((out / "2.json").read_text())
    assert len(rec["input_points"]) == len(rec["points"]) + len(rec["removed"]) > 0
