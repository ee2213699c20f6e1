"""Evaluation harness: known-answer mDSC (oracle SAM), bootstrap, reference selection, caching, skips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ppd.evaluate import (
    EvalConfig,
    EvalDataset,
    Evaluator,
    bootstrap_ci,
    distance_transform,
    load_config,
    most_interior_point,
    select_reference,
)
from ppd.inference import PromptDefender
from tests.helpers.defender import TINY_ENV, FakeFeatureCache, oracle_decode, write_tiny_training_checkpoint
from tests.helpers.synthetic import synthetic_pair, write_folder_dataset


def test_bootstrap_contains_mean_and_is_deterministic() -> None:
    v = np.random.default_rng(1).uniform(0, 1, 40)
    lo, hi = bootstrap_ci(v, 1000, 0.95, seed=3)
    assert lo < v.mean() < hi and hi - lo < 0.4
    assert bootstrap_ci(v, 1000, 0.95, seed=3) == (lo, hi)
    assert bootstrap_ci(v, 1000, 0.95, seed=4) != (lo, hi)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([])))


def test_reference_selection_is_deterministic() -> None:
    stems = [f"s{i}" for i in range(20)]
    a = select_reference(stems, {"seed": 7})
    assert a == select_reference(list(stems), {"seed": 7})
    assert a[1] == {"stem": a[0], "rule": "seed", "seed": 7}
    assert {select_reference(stems, {"seed": s})[0] for s in range(10)} != {a[0]}  # the seed matters
    assert select_reference(stems, {"stem": "s4"}) == ("s4", {"stem": "s4", "rule": "stem"})
    assert select_reference(stems, None) == ("s0", {"stem": "s0", "rule": "first"})
    with pytest.raises(ValueError, match="not in the data set"):
        select_reference(stems, {"stem": "nope"})


def test_distance_transform_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(13, 17)) < 0.7
    d = distance_transform(m)
    bg = np.argwhere(np.pad(~m, 1, constant_values=True)) - 1  # background incl. the outside border
    for y, x in np.argwhere(m):
        assert d[y, x] == pytest.approx(np.sqrt(((bg - [y, x]) ** 2).sum(1).min()), abs=1e-5)
    assert (d[~m] == 0).all()
    rect = np.zeros((20, 30), bool)
    rect[4:15, 6:27] = True  # bg rows 3, 15 -> deepest row 9 (d=6); d>=6 for cols 11..21 -> first = 11
    assert most_interior_point(rect) == (11.5, 9.5)
    assert most_interior_point(np.zeros((5, 5), bool)) is None


def _setup(
    tmp_path: Path, tiny_sam, methods: list[str], attacker: bool = False
) -> tuple[EvalConfig, PromptDefender]:
    from ppd.models.qnet import QNetwork

    root = write_folder_dataset(tmp_path / "data", n=5)
    ck = write_tiny_training_checkpoint(tmp_path / "train.ckpt") if attacker else None
    qnet = QNetwork(in_dim=53, hidden=16, layers=1, heads=2)
    defender = PromptDefender(qnet, dict(TINY_ENV), tiny_sam, FakeFeatureCache(), max_steps=2)
    cfg = EvalConfig(
        output_dir=str(tmp_path / "out"),
        datasets=[EvalDataset(name="syn", root=str(root), reference={"stem": "2"})],
        methods=methods,
        attacker=str(ck) if ck else None,
        attack_steps=2,
        bootstrap={"resamples": 200, "confidence": 0.95},
    )
    return cfg, defender


def test_known_answer_with_oracle_sam(tmp_path: Path, tiny_sam, monkeypatch) -> None:
    monkeypatch.setattr("ppd.env.prompt_env.decode", oracle_decode)
    monkeypatch.setattr("ppd.models.sam.decode", oracle_decode)
    cfg, defender = _setup(tmp_path, tiny_sam, ["ideal", "one_click", "persam", "attack(ideal)"])
    res = Evaluator(cfg, defender=defender, progress=False).run()
    sec = res["datasets"][0]
    assert sec["reference"] == {"stem": "2", "rule": "stem"} and sec["n_images"] == 4
    # oracle SAM: full-image mask whenever a positive prompt is active -> Dice = 2|G| / (|G| + HW)
    expected = {}
    for i in (0, 1, 3, 4):  # the reference "2" is excluded
        _, gt = synthetic_pair(i)
        expected[str(i)] = (2 * gt.sum() / (gt.sum() + gt.size), gt.sum() / gt.size)
    for m in ("ideal", "one_click", "persam"):
        e = sec["methods"][m]
        assert set(e["per_image"]) == set(expected)
        for s, (dice, iou) in expected.items():
            assert e["per_image"][s]["dice"] == pytest.approx(dice, abs=1e-6)
            assert e["per_image"][s]["iou"] == pytest.approx(iou, abs=1e-6)
        assert e["mdsc"] == pytest.approx(np.mean([v[0] for v in expected.values()]), abs=1e-6)
        assert e["mdsc_ci"][0] <= e["mdsc"] <= e["mdsc_ci"][1]
    assert sec["methods"]["attack(ideal)"]["skipped"].startswith("no attacker configured")
    out = Path(cfg.output_dir)
    md = (out / "results.md").read_text()
    assert "original image resolution" in md and "skipped: no attacker" in md and "`2` (stem), excluded" in md
    assert json.loads((out / "results.json").read_text())["datasets"][0]["methods"]["ideal"]["n"] == 4
    assert "syn,ideal,4," in (out / "results.csv").read_text()


def test_cache_and_limit_make_reruns_cheap(tmp_path: Path, tiny_sam, monkeypatch) -> None:
    monkeypatch.setattr("ppd.env.prompt_env.decode", oracle_decode)
    cfg, defender = _setup(
        tmp_path,
        tiny_sam,
        ["feature_matching", "feature_matching+ppd", "attack(ideal)", "defense(attack(ideal))"],
        attacker=True,
    )
    first = Evaluator(cfg, defender=defender, progress=False).run(limit=2)
    sec = first["datasets"][0]
    assert sec["n_images"] == 2 and sec["fm_no_positive"]["of"] == 2
    assert [p["a"] for p in sec["paired"]] == ["feature_matching+ppd", "defense(attack(ideal))"]
    assert sec["methods"]["feature_matching+ppd"]["mean_defender_steps"] <= 2
    caches = sorted(p.name for p in (tmp_path / "out" / "cache").iterdir())
    assert len(caches) == 4 and all("__syn__" in c for c in caches)

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr("ppd.evaluate._StateStore.compute", boom)
    again = Evaluator(cfg, defender=defender, progress=False).run(limit=2)
    for m in ("feature_matching", "feature_matching+ppd", "defense(attack(ideal))"):
        assert again["datasets"][0]["methods"][m]["per_image"] == sec["methods"][m]["per_image"]


def test_load_config_validates(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: o\ndatasets: [{root: r}]\nmethods: [ideal, magic]\n")
    with pytest.raises(ValueError, match="unknown methods"):
        load_config(p)
    p.write_text("output_dir: o\ndatasets: [{root: r, reference: {index: 1}}]\n")
    with pytest.raises(ValueError, match="reference"):
        load_config(p)
    p.write_text('output_dir: o\ndatasets:\n  - root: "${oc.env:PPD_TEST_ROOT,abc}/x"\n')
    assert load_config(p).datasets[0].root == "abc/x" and load_config(p).datasets[0].name == "x"
    for name in ("table1_cvc", "table1_ph2", "table2_oneshot", "quickstart"):
        load_config(Path(__file__).parents[2] / "configs" / "eval" / f"{name}.yaml")


def test_seeded_ideal_prompts_are_reproducible(tmp_path: Path, tiny_sam, monkeypatch) -> None:
    monkeypatch.setattr("ppd.env.prompt_env.decode", oracle_decode)
    cfg, defender = _setup(tmp_path, tiny_sam, ["ideal"])
    Evaluator(cfg, defender=defender, progress=False).run()
    a = json.loads(next((tmp_path / "out" / "cache").iterdir()).read_text())["records"]
    cfg.output_dir = str(tmp_path / "out2")
    Evaluator(cfg, defender=defender, progress=False).run()
    b = json.loads(next((tmp_path / "out2" / "cache").iterdir()).read_text())["records"]
    assert {s: r["status"] for s, r in a.items()} == {s: r["status"] for s, r in b.items()}
    assert torch.tensor([int(c) for c in a["0"]["status"]]).gt(0).any()
