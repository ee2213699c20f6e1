"""``python -m ppd.fit`` end to end on the tiny config: training, checkpoints, resume, export, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ppd.fit import PPDCLI, build_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"


@pytest.fixture()
def run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path.parent / "ppd_tiny_cache"))  # shared by the tests here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    yield tmp_path / "runs" / "tiny"
    import wandb

    wandb.finish()  # each test gets its own offline run


def _fit(*extra: str) -> PPDCLI:
    cli = build_cli(["--config", str(TINY), *extra])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


def test_max_episodes_stop_mid_epoch_still_checkpoints_the_final_state(run_env: Path) -> None:
    """Training that ends on ``max_episodes`` between two periodic checkpoints must still save its end."""
    cli = _fit(
        "--model.init_args.max_episodes=1",
        "--data.init_args.batches_per_epoch=50",
        "--trainer.callbacks.init_args.every_n_train_steps=4",  # a periodic save before the stop, none at it
        "--trainer.check_val_every_n_epoch=2",
    )
    task = cli.model
    assert task.episode == 1 and cli.trainer.global_step < 50  # stopped inside the first epoch
    assert cli.trainer.global_step % 4 != 0, "the stop must fall between two periodic checkpoints"
    ckpt = torch.load(run_env / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == cli.trainer.global_step
    assert ckpt["ppd"]["episode"] == 1 and ckpt["ppd"]["env_steps"] == task.env_steps


def test_tiny_fit_trains_logs_and_checkpoints(run_env: Path) -> None:
    cli = _fit()
    m = cli.trainer.callback_metrics
    for key in (
        "train/td_loss_att",
        "train/epsilon",
        "val/attack_drop",
        "val/random_attack_drop",
        "val/defense_gain",
        "val/random_defense_gain",
    ):
        assert key in m, f"{key} not logged; have {sorted(m)}"
    assert (
        any(k.startswith("train/td_loss_def") for k in cli.trainer.logged_metrics) or "train/td_loss_def" in m
    )
    task = cli.model
    assert task.episode >= 1 and task.env_steps > 0
    assert task.grad_steps["attack"] > 0 and task.grad_steps["defend"] > 0
    ckpt = torch.load(run_env / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    st = ckpt["ppd"]
    assert st["env_steps"] == task.env_steps and st["episode"] == task.episode
    assert st["env_config"]["grid"] == 8 and st["env_config"]["dino_name"] == "tiny"
    assert set(k.split(".")[0] for k in ckpt["state_dict"]) == {
        "q_att",
        "q_def",
        "q_att_target",
        "q_def_target",
    }
    assert len(ckpt["optimizer_states"]) == 2
    assert (run_env / "config.yaml").is_file()  # config saved beside the checkpoints
    assert list((run_env / "wandb").glob("offline-run-*")), "no offline W&B run written"


def test_resume_continues_counters_and_epsilon_exactly(run_env: Path) -> None:
    full = _fit("--trainer.max_epochs=2", "--data.init_args.save_buffers=true")
    ref = (full.model.env_steps, full.model.episode, full.model.epsilon, dict(full.model.grad_steps))
    ref_weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    ckpts = run_env / "checkpoints"
    mid = ckpts / "epoch=0-step=4.ckpt"  # mid-epoch (6 batches per epoch), mid-episode
    assert mid.is_file(), sorted(p.name for p in ckpts.iterdir())
    saved = torch.load(mid, map_location="cpu", weights_only=True)["ppd"]
    resumed = _fit("--trainer.max_epochs=2", "--data.init_args.save_buffers=true", f"--ckpt_path={mid}")
    r = resumed.model
    assert saved["env_steps"] < ref[0]
    assert (r.env_steps, r.episode, r.epsilon, dict(r.grad_steps)) == ref
    assert resumed.trainer.global_step == full.trainer.global_step
    for k, v in r.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], msg=f"weights differ after resume: {k}")
    # a checkpoint of the layout before the buffers moved into the Actor (replay RNG and buffers in the data
    # module's section) resumes the same way
    ck = torch.load(mid, map_location="cpu", weights_only=True)
    assert "buffers" in ck["ppd"] and "sample_generator" in ck["ppd"]
    ck["ReplayDataModule"] = {
        **ck.get("ReplayDataModule", {}),
        "generator": ck["ppd"].pop("sample_generator"),
        "buffers": ck["ppd"].pop("buffers"),
    }
    old = run_env / "old_layout.ckpt"
    torch.save(ck, old)
    resumed_old = _fit("--trainer.max_epochs=2", "--data.init_args.save_buffers=true", f"--ckpt_path={old}")
    r = resumed_old.model
    assert (r.env_steps, r.episode, r.epsilon, dict(r.grad_steps)) == ref
    for k, v in r.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], msg=f"weights differ after an old-layout resume: {k}")


def test_export_gives_a_loadable_defender(run_env: Path, tmp_path: Path) -> None:
    from ppd.export import export_defender, load_defender

    cli = _fit("--trainer.max_epochs=1")
    out = export_defender(run_env / "checkpoints" / "last.ckpt", tmp_path / "defender.pt")
    assert out.stat().st_size < 1_000_000
    agent, env_cfg = load_defender(out)
    torch.testing.assert_close(agent.online.state_dict(), cli.model.q_def.state_dict())
    assert env_cfg["grid"] == 8
    with pytest.raises(FileExistsError):
        export_defender(run_env / "checkpoints" / "last.ckpt", out)


@pytest.mark.slow
def test_ddp_two_cpu_ranks_both_contribute(run_env: Path) -> None:
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "ppd.fit",
        "--config",
        str(TINY),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--data.init_args.train.limit=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = torch.load(run_env / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    per_rank = ckpt["ppd"]["transitions_per_rank"]
    assert len(per_rank) == 2 and all(t > 0 for t in per_rank), per_rank
    assert per_rank[0] == per_rank[1]  # lock-step phases: same number of env steps on every rank


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_fit_input_errors_are_one_line_and_write_nothing(run_env: Path, tmp_path: Path, capsys) -> None:
    from ppd.fit import main

    assert main(["--config", str(TINY), "--data.init_args.train.root=/nonexistent/cvc"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "data.init_args.train.root" in line and "/nonexistent/cvc does not exist" in line
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00 not a checkpoint")
    assert main(["--config", str(TINY), "--ckpt_path", str(junk)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert str(junk) in line and "not a readable Lightning checkpoint" in line
    assert not run_env.exists()  # no logger, W&B run, config or checkpoint was created
    (run_env / "checkpoints").mkdir(parents=True)
    (run_env / "checkpoints" / "last.ckpt").write_bytes(b"first run")
    assert main(["--config", str(TINY)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "already holds a run" in line and "--overwrite" in line
    assert (run_env / "checkpoints" / "last.ckpt").read_bytes() == b"first run"


def test_data_root_flag_reaches_the_config_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "unused")  # restored after the test (the flag sets it)
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "c.yaml"
    text = TINY.read_text().replace("root: examples/data/cvc_clinicdb", 'root: "${data_root}/cvc_clinicdb"')
    cfg.write_text("data_root: ${oc.env:DATA_ROOT,nowhere}\n" + text)
    cli = build_cli(["--config", str(cfg), "--data_root", str(ROOT / "examples" / "data")])
    assert cli.datamodule.train_cfg.root == str(ROOT / "examples" / "data" / "cvc_clinicdb")


def test_export_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from ppd.export import main

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"junk")
    assert main([str(junk), str(tmp_path / "d.pt")]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert str(junk) in line and "cannot be read as a torch checkpoint" in line
    partial = tmp_path / "partial.ckpt"
    torch.save({"ppd": {"episode": 1}, "state_dict": {}, "hyper_parameters": {"hidden": 8}}, partial)
    assert main([str(partial), str(tmp_path / "d.pt")]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "lacks" in line and "feature_dim" in line and "ppd.env_config" in line
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.slow
def test_short_training_learns_to_remove_harmful_prompts(run_env: Path, tmp_path: Path, monkeypatch) -> None:
    """PPDTask learns: on images with known harmful prompts it removes them more often than chance.

    Judge: the prompt-dependent box decoder (mask = box of the positive points), so a positive prompt
    outside the object is harmful (it widens the box) and removing it raises Dice. Synthetic images (a
    bright ellipse on a darker texture) let the node features tell inside from outside. After a short
    seeded training, the defender's first removal from (inside positives + 2 outside positives) must hit an
    outside positive more often than a uniformly random defender does (2 / number of active prompts).
    """
    import numpy as np

    from ppd.env.prompts import mask_on_grid
    from tests.helpers.defender import box_decode
    from tests.helpers.synthetic import write_folder_dataset

    monkeypatch.setattr("ppd.env.decoders.decode", box_decode)
    root = write_folder_dataset(tmp_path / "syn", n=12, seed=3)
    cli = _fit(
        f"--data.init_args.train.root={root}",
        "--data.init_args.train.limit=12",
        f"--data.init_args.val.root={root}",
        "--data.init_args.val.limit=2",
        "--data.init_args.budget_range=[2, 4]",
        "--data.init_args.batches_per_epoch=100",
        "--data.init_args.envs_per_rank=4",
        "--data.init_args.batch_size=32",
        "--model.init_args.epsilon_episodes=30",
        "--model.init_args.image_log_every=0",
        "--trainer.max_epochs=3",
        "--trainer.check_val_every_n_epoch=100",
        "--trainer.logger=false",
        "--trainer.callbacks.init_args.every_n_train_steps=1000",
    )
    env, defender = cli.datamodule.env, cli.model.agents["defend"].eval()
    g = torch.Generator().manual_seed(0)
    starts, harmful = [], []
    for i in range(len(env)):
        inside = mask_on_grid(env.masks[i], env.grid).reshape(-1)
        s = torch.zeros(env.num_nodes, dtype=torch.long)
        s[inside.nonzero().reshape(-1)[torch.randperm(int(inside.sum()), generator=g)[:3]]] = 1
        out = (~inside).nonzero().reshape(-1)
        bad = out[torch.randperm(len(out), generator=g)[:2]]
        s[bad] = 1
        starts.append(s)
        harmful.append(set(bad.tolist()))
    ids = torch.arange(len(env))
    act, _ = defender.select(defender.inputs(env), ids, torch.stack(starts))
    hits = np.mean([int(a) in h for a, h in zip(act.tolist(), harmful, strict=True)])
    chance = np.mean([2 / int((s > 0).sum()) for s in starts])
    assert hits > chance + 0.2, (
        f"trained defender removed a harmful prompt first in {hits:.2f} (chance {chance:.2f})"
    )


def test_tiny_fit_with_issue11_levers_trains_on_fm_starts_and_exports_inference_settings(
    run_env: Path, tmp_path: Path
) -> None:
    """Active budgets, updates per step and FM validation end to end; the exported inference settings."""
    from ppd.export import export_defender, load_defender
    from ppd.rl.actor import warm_start
    from ppd.rl.replay import ReplayBuffer
    from ppd.rl.rollout import greedy_defence

    cli = _fit(
        '--model.init_args.defence_starts={"greedy": 0.5, "random": 0.25, "feature_matching": 1.0}',
        "--model.init_args.defend_budget=active",
        "--model.init_args.oracle_margin_weight=1.0",
        "--model.init_args.val_feature_matching=true",
        "--model.init_args.updates_per_step=2",
        "--model.init_args.inference_max_steps=4",
    )
    task, dm = cli.model, cli.datamodule
    # updates_per_step: 2 epochs x 6 training steps x 2 optimiser steps (Lightning's global_step counts them)
    assert task.grad_steps["attack"] + task.grad_steps["defend"] == 2 * 6 * 2 == cli.trainer.global_step
    # defend_budget: active: a defence episode ends exactly when its budget, the number of prompts active at
    # its start, is used up, i.e. with every prompt removed (a budget from budget_range [2, 3] ends some with
    # prompts left, as the random warm start does). The warm start's transitions come first: replay it.
    warm = {r: ReplayBuffer(dm.buffer_capacity, dm.num_nodes) for r in ("attack", "defend")}
    need = max(min(dm.batch_size, dm.buffer_capacity), dm.warm_start_steps)
    warm_start(dm.env, dm.ideal, warm, need, dm.envs_per_rank, task.hparams.seed + 1000)
    n0, buf = len(warm["defend"]), task.actor.buffers["defend"].state_dict()
    assert torch.equal(buf["next_status"][:n0], warm["defend"].state_dict()["next_status"])  # exact replay
    warm_done = buf["done"][:n0].bool()
    assert bool((buf["next_status"][:n0][warm_done] != 0).any())  # fixed budgets: prompts left
    done = buf["done"][n0:].bool()
    assert bool(done.any())
    assert bool((buf["next_status"][n0:][done] == 0).all())
    # val_feature_matching: the logged FM metrics are the inference loop of the exported defender on the FM
    # starts of the same seeded draw (one validation batch: batch_idx 0)
    out = export_defender(run_env / "checkpoints" / "last.ckpt", tmp_path / "d.pt")
    agent, env_cfg = load_defender(out)
    assert env_cfg["max_steps"] == 4 and env_cfg["keep_last_positive"] is True
    assert env_cfg["feature_matching"] == dm.fm_options
    env, ids = dm.val_env, torch.arange(len(dm.val_env))
    fm = dm.feature_matching_starts(ids, torch.Generator().manual_seed(task.hparams.seed), "val")
    tr = greedy_defence(env, agent, ids, fm, env_cfg["max_steps"], env_cfg["keep_last_positive"])
    before, after = env.dice_of(ids, fm), env.dice_of(ids, tr.status)
    m = cli.trainer.callback_metrics
    assert float(m["val/fm_dice"]) == pytest.approx(float(before.mean()), abs=1e-6)
    assert float(m["val/fm_defended_dice"]) == pytest.approx(float(after.mean()), abs=1e-6)
    assert float(m["val/fm_defender_actions"]) == pytest.approx(float(tr.steps.float().mean()), abs=1e-6)
    # the start mixture's kinds, FM starts from the same draws and the margin loss only on the defender are
    # checked against seeded expectations in tests/unit/test_actor.py
