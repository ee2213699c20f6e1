"""``python -m ppd.fit`` with the counterfactual defender (issue 23) on the tiny config: tables written once
and reused, fit, validation on dev FM prompts, checkpoint -> ``ppd.export`` -> the inference loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ppd.counterfactual import datamodule_from_config
from ppd.counterfactual import main as cf_main
from ppd.fit import build_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_cf.yaml"


@pytest.fixture()
def run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path.parent / "ppd_tiny_cache"))
    monkeypatch.chdir(ROOT)
    yield tmp_path / "runs"


def test_tables_cli_then_fit_reuses_them_and_exports_a_working_defender(
    run_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ppd.export import export_defender, load_defender
    from ppd.rl.rollout import greedy_defence

    # the tables in two worker processes' shares, by the command line
    assert cf_main(["--config", str(TINY), "--worker", "0/2", "--quiet"]) == 0
    assert cf_main(["--config", str(TINY), "--worker", "1/2", "--quiet"]) == 0
    assert "decodes" in capsys.readouterr().out
    shards = sorted((run_env / "tiny_cf_tables").glob("shard_*.pt"))
    assert len(shards) == 3  # 5 images, 2 per shard
    stamps = [s.stat().st_mtime_ns for s in shards]

    cli = build_cli(["--config", str(TINY)])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [s.stat().st_mtime_ns for s in shards] == stamps, "fit must reuse the tables, not rewrite them"
    dm, m = cli.datamodule, cli.trainer.callback_metrics
    for key in (
        "train/mse",
        "train/rank",
        "val/fm_gain",
        "val/fm_removed",
        "val/table_top1",
        "val/table_mse",
    ):
        assert key in m, key
    # the fit saw exactly the non-held-out states of the tables
    n_states = sum(len(torch.load(s, weights_only=True)["stems"]) for s in shards)
    assert len(dm.fit_table["status"]) + len(dm.holdout_table["status"]) == n_states
    assert len(dm.holdout_table["status"]) > 0
    held = set(dm.holdout_table["image_ids"].tolist())
    assert held.isdisjoint(dm.fit_table["image_ids"].tolist())  # held out by image, not by state
    assert cli.model.hparams.feature_dim == dm.feature_dim == dm.env.image(0).x_static.shape[1] + 3 + 3

    # unseen-domain runs fit the states of some data sets only, from the same tables
    dm1 = datamodule_from_config(str(TINY), ["data.init_args.fit_datasets=[1]"])
    dm1.setup("fit")
    assert [s.stat().st_mtime_ns for s in shards] == stamps
    assert set(dm1.train_groups[dm1.fit_table["image_ids"]].tolist()) == {1}
    assert 0 < len(dm1.fit_table["status"]) < len(dm.fit_table["status"]) + len(dm.holdout_table["status"])
    # the label-margin ablation adds its term only when weighted
    ids, status, rewards, _ = (dm.fit_table[k][:4] for k in ("image_ids", "status", "rewards", "sam"))
    q = torch.zeros(status.shape, requires_grad=True)
    assert "margin" not in cli.model.losses(q, rewards, status, dm.node_fg[ids])
    cli.model.hparams.label_margin_weight = 1.0
    out = cli.model.losses(q, rewards, status, dm.node_fg[ids])
    assert float(out["loss"]) == pytest.approx(float(out["mse"] + out["rank"] + out["margin"]), rel=1e-6)
    assert float(out["margin"]) > 0  # Q = 0 violates every margin

    # validation's fm_gain is what the inference loop gives on the same FM starts
    ckpt = run_env / "tiny_cf" / "checkpoints" / "last.ckpt"
    out = export_defender(ckpt, tmp_path / "defender.pt")
    agent, env_cfg = load_defender(out)
    assert env_cfg["sam_inputs"] is True and env_cfg["max_steps"] is None and env_cfg["keep_last_positive"]
    torch.testing.assert_close(agent.online.state_dict(), cli.model.q_def.state_dict())
    ids = torch.arange(len(dm.val_env))
    g = torch.Generator().manual_seed(cli.model.hparams.seed * 7919 + 0)
    start = dm.feature_matching_starts(ids, g, "val")
    tr = greedy_defence(dm.val_env, agent, ids, start, None, True, sam_inputs=True)
    gain = (dm.val_env.dice_of(ids, tr.status) - dm.val_env.dice_of(ids, start)).mean()
    assert float(m["val/fm_gain"]) == pytest.approx(float(gain), abs=1e-6)


def test_tables_of_other_settings_are_refused_in_one_line(
    run_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cf_main(
            ["--config", str(TINY), "--quiet", "data.init_args.train=[{root: examples/data/ph2, limit: 2}]"]
        )
        == 0
    )
    dm = datamodule_from_config(str(TINY), ["data.init_args.oracle_steps=3"])
    with pytest.raises(ValueError, match="generated with other settings"):
        dm.write_tables(progress=False)
    assert cf_main(["--config", "configs/quickstart.yaml"]) == 2
    assert "CounterfactualDataModule" in capsys.readouterr().err
