"""Evaluation harness: registry, known-answer mDSC with a prompt-dependent decoder, bootstrap, caching, skips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ppd.env.prompts import status_to_points
from ppd.eval import (
    EvalConfig,
    EvalDataset,
    Evaluator,
    MethodOutput,
    bootstrap_ci,
    get_method,
    load_config,
    paired_difference,
    register_method,
    select_reference,
    unregister_method,
)
from ppd.eval.cache import status_from_code
from ppd.eval.methods.clicks import distance_transform, most_interior_point
from ppd.eval.runner import _DatasetRun
from ppd.inference import PromptDefender
from tests.helpers.defender import (
    TINY_ENV,
    FakeFeatureCache,
    box_decode,
    box_mask,
    write_tiny_training_checkpoint,
)
from tests.helpers.synthetic import HEIGHT, WIDTH, synthetic_pair, write_folder_dataset


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


def test_bootstrap_contains_mean_and_is_deterministic() -> None:
    v = np.random.default_rng(0).random(50)
    lo, hi = bootstrap_ci(v, 500, 0.95, seed=3)
    assert lo <= v.mean() <= hi and (lo, hi) == bootstrap_ci(v, 500, 0.95, seed=3)
    assert bootstrap_ci([], 10) != bootstrap_ci([], 10)  # (nan, nan)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(v, 10, 1.5)
    mean, (dlo, dhi) = paired_difference(v, v - 0.1, 200, 0.95, seed=1)
    assert mean == pytest.approx(0.1) and dlo == pytest.approx(0.1) and dhi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equal shapes"):
        paired_difference(v, v[:3])


def test_reference_selection_is_deterministic() -> None:
    stems = [f"s{i}" for i in range(10)]
    assert select_reference(stems, None) == ("s0", {"stem": "s0", "rule": "first"})
    assert select_reference(stems, {"stem": "s4"})[0] == "s4"
    a, rec = select_reference(stems, {"seed": 5})
    assert a == select_reference(stems, {"seed": 5})[0] and rec["rule"] == "seed"
    with pytest.raises(ValueError, match="not in the data set"):
        select_reference(stems, {"stem": "nope"})


def test_distance_transform_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((9, 11)) > 0.3
    d = distance_transform(m)
    padded = np.pad(m, 1)
    bg = np.argwhere(~padded)
    for y, x in np.argwhere(m):
        ref = np.sqrt(((bg - [y + 1, x + 1]) ** 2).sum(1)).min()
        assert d[y, x] == pytest.approx(ref, abs=1e-5)
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


@pytest.fixture
def box_sam(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAM's decoder replaced by the prompt-dependent box decoder everywhere it is called."""
    monkeypatch.setattr("ppd.env.decoders.decode", box_decode)
    monkeypatch.setattr("ppd.models.sam.decode", box_decode)


def test_known_answer_with_prompt_dependent_decoder(tmp_path: Path, tiny_sam, box_sam) -> None:
    """Every row's per-image Dice equals the hand-computed Dice of the box of its own positive prompts."""
    methods = ["ideal", "feature_matching", "persam", "one_click", "attack(ideal)"]
    cfg, defender = _setup(tmp_path, tiny_sam, methods)
    res = Evaluator(cfg, defender=defender, progress=False).run()
    sec = res["datasets"][0]
    assert sec["reference"] == {"stem": "2", "rule": "stem"} and sec["n_images"] == 4
    grid = TINY_ENV["grid"]
    caches = {
        p.name.split("__")[0]: json.loads(p.read_text()) for p in (tmp_path / "out" / "cache").iterdir()
    }
    for m in ("ideal", "feature_matching", "persam", "one_click"):
        e = sec["methods"][m]
        assert set(e["per_image"]) == {"0", "1", "3", "4"}  # the reference "2" is excluded
        for s, got in e["per_image"].items():
            _, gt = synthetic_pair(int(s))
            rec = caches[m]["records"][s]
            if m == "one_click":
                pts, lab = np.array([rec["click"]]), np.array([1])
            else:
                pts, lab = status_to_points(status_from_code(rec["status"]), grid, HEIGHT, WIDTH)
            expected = _dice(box_mask(pts, lab, HEIGHT, WIDTH), gt)
            assert got["dice"] == pytest.approx(expected, abs=1e-6), (m, s)
        assert e["mdsc"] == pytest.approx(np.mean([v["dice"] for v in e["per_image"].values()]))
        assert e["mdsc_ci"][0] <= e["mdsc"] <= e["mdsc_ci"][1]
    # the decoder depends on the prompts, so the rows differ (a full-image decoder would tie them)
    assert len({round(sec["methods"][m]["mdsc"], 6) for m in ("ideal", "persam", "one_click")}) == 3
    assert sec["methods"]["attack(ideal)"]["skipped"].startswith("no attacker configured")
    out = Path(cfg.output_dir)
    md = (out / "results.md").read_text()
    assert "original image resolution" in md and "skipped: no attacker" in md and "`2` (stem), excluded" in md
    assert json.loads((out / "results.json").read_text())["datasets"][0]["methods"]["ideal"]["n"] == 4
    assert "syn,ideal,4," in (out / "results.csv").read_text()


def test_registered_toy_method_appears_in_the_table(tmp_path: Path, tiny_sam, box_sam) -> None:
    @register_method("toy_gt_box", output="mask", description="the GT itself (test)")
    def toy(ctx, stems):  # noqa: ANN001, ANN202
        return {s: MethodOutput(mask=ctx.gt_mask(s), extra={"toy": True}) for s in stems}

    @register_method("toy_needs_ckpt", output="mask", needs=("checkpoint",))
    def toy2(ctx, stems):  # noqa: ANN001, ANN202
        raise AssertionError("must be skipped: no checkpoint configured")

    try:
        cfg, defender = _setup(
            tmp_path, tiny_sam, ["ideal", "toy_gt_box", "toy_needs_ckpt", "oracle_removal(ideal)"]
        )
        cfg.paired = [["toy_gt_box", "ideal"]]
        res = Evaluator(cfg, defender=defender, progress=False).run()
        sec = res["datasets"][0]
        assert sec["methods"]["toy_gt_box"]["mdsc"] == pytest.approx(1.0)
        assert (
            sec["methods"]["toy_needs_ckpt"]["skipped"]
            == "no checkpoint configured (checkpoints.toy_needs_ckpt)"
        )
        # the removal ceiling is never below its source
        for s, r in sec["methods"]["oracle_removal(ideal)"]["per_image"].items():
            assert r["dice"] >= sec["methods"]["ideal"]["per_image"][s]["dice"] - 1e-6
        md = (Path(cfg.output_dir) / "results.md").read_text()
        assert "| toy_gt_box | 4 | 1.000" in md and "`toy_gt_box` − `ideal`" in md
        assert "toy_gt_box" in (Path(cfg.output_dir) / "results.csv").read_text()
    finally:
        unregister_method("toy_gt_box")
        unregister_method("toy_needs_ckpt")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("toy_gt_box")


def test_templates_bind_their_source() -> None:
    m = get_method("defense(attack(ideal))")
    assert m.uses == ("attack(ideal)",) and m.needs == ("defender",) and m.output == "state"
    assert get_method("oracle_removal(feature_matching)").uses == ("feature_matching",)
    with pytest.raises(ValueError, match="gives masks"):
        get_method("defense(one_click)")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("defense(nope)")


def test_cache_and_limit_make_reruns_cheap(tmp_path: Path, tiny_sam, box_sam, monkeypatch) -> None:
    methods = ["feature_matching", "feature_matching+ppd", "attack(ideal)", "defense(attack(ideal))"]
    cfg, defender = _setup(tmp_path, tiny_sam, methods, attacker=True)
    first = Evaluator(cfg, defender=defender, progress=False).run(limit=2)
    sec = first["datasets"][0]
    assert sec["n_images"] == 2 and sec["fm_no_positive"]["of"] == 2
    assert [p["a"] for p in sec["paired"]] == ["feature_matching+ppd", "defense(attack(ideal))"]
    assert sec["methods"]["feature_matching+ppd"]["mean_defender_steps"] <= 2
    caches = sorted(p.name for p in (tmp_path / "out" / "cache").iterdir())
    assert len(caches) == 5 and all("__syn__" in c for c in caches)  # + ideal, used by the attack rows

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(_DatasetRun, "compute", boom)
    again = Evaluator(cfg, defender=defender, progress=False).run(limit=2)
    for m in methods:
        assert again["datasets"][0]["methods"][m]["per_image"] == sec["methods"][m]["per_image"]
    # a changed dependency (the attacker's step count) recomputes the rows that use it, and only those
    cfg.attack_steps = 1
    with pytest.raises(AssertionError, match="recomputed"):
        Evaluator(cfg, defender=defender, progress=False).run(limit=2)


def test_load_config_validates(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: o\ndatasets: [{root: r}]\nmethods: [ideal, magic]\n")
    with pytest.raises(ValueError, match="unknown methods"):
        load_config(p)
    p.write_text("output_dir: o\ndatasets: [{root: r, reference: {index: 1}}]\n")
    with pytest.raises(ValueError, match="reference"):
        load_config(p)
    p.write_text(
        "output_dir: o\ndatasets: [{root: r}]\nmethods: ['oracle_removal(defense(feature_matching))']\n"
    )
    assert load_config(p).methods == ["oracle_removal(defense(feature_matching))"]
    p.write_text('output_dir: o\ndatasets:\n  - root: "${oc.env:PPD_TEST_ROOT,abc}/x"\n')
    assert load_config(p).datasets[0].root == "abc/x" and load_config(p).datasets[0].name == "x"
    p.write_text("output_dir: o\ndatasets: [{root: r}]\nmax_steps: -1\n")
    with pytest.raises(ValueError, match="max_steps"):
        load_config(p)


def test_seeded_ideal_prompts_are_reproducible(tmp_path: Path, tiny_sam, box_sam) -> None:
    cfg, defender = _setup(tmp_path, tiny_sam, ["ideal"])
    Evaluator(cfg, defender=defender, progress=False).run()
    a = json.loads(next((tmp_path / "out" / "cache").iterdir()).read_text())["records"]
    cfg.output_dir = str(tmp_path / "out2")
    Evaluator(cfg, defender=defender, progress=False).run()
    b = json.loads(next((tmp_path / "out2" / "cache").iterdir()).read_text())["records"]
    assert {s: r["status"] for s, r in a.items()} == {s: r["status"] for s, r in b.items()}
    assert torch.tensor([int(c) for c in a["0"]["status"]]).gt(0).any()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ppd.eval.cli import main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "oracle_removal(X)" in capsys.readouterr().out
