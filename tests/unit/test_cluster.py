"""Cluster tooling without a cluster: cache shards, checkpoint resolution, templates (stub ``srun``), W&B presets."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from ppd.cache import main as cache_main
from ppd.cache import parse_shard
from ppd.callbacks import job_id_for_requeue
from ppd.fit import build_cli, resolve_ckpt_path
from tests.helpers.synthetic import write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "experiments" / "slurm"
SWEEP = ROOT / "experiments" / "sweeps" / "ppd.yaml"


@pytest.fixture()
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    yield tmp_path
    import wandb

    wandb.finish()


# -- ppd.cache --shard ------------------------------------------------------------------------------
def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/2", "-1/2", "0/0", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_cache_shards_are_disjoint_and_cover_the_data_set(tmp_path: Path) -> None:
    from ppd.data.datasets import SegmentationFolder
    from ppd.data.features import FeatureCache

    root = write_folder_dataset(tmp_path / "ds", n=5, seed=2)
    cfg = tmp_path / "c.yaml"
    cache_block = "{sam_variant: tiny, dino_name: tiny, dino_resolution: 112, root: ROOT}"
    images = [s.image for s in SegmentationFolder(root)]
    covered = []
    for i in range(2):
        part = tmp_path / f"cache{i}"
        cfg.write_text(f"datasets: [{{root: {root}}}]\ncache: {cache_block.replace('ROOT', str(part))}\n")
        assert cache_main(["--config", str(cfg), "--quiet", "--shard", f"{i}/2"]) == 0
        c = FeatureCache(root=str(part), sam_variant="tiny", dino_name="tiny", dino_resolution=112)
        covered.append({j for j, im in enumerate(images) if c.contains(im)})
    assert covered == [{0, 2, 4}, {1, 3}]


def test_cache_cli_rejects_a_bad_shard(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cache_main(["--config", str(tmp_path / "x.yaml"), "--shard", "2/2"])


# -- requeue helpers ----------------------------------------------------------------------------------
def test_job_id_for_requeue() -> None:
    assert job_id_for_requeue({"SLURM_JOB_ID": "17"}) == "17"
    env = {"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "3"}
    assert job_id_for_requeue(env) == "10_3"
    with pytest.raises(KeyError):
        job_id_for_requeue({})


class _FakeTrainer:
    def __init__(self, root: Path) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        self.default_root_dir = str(root)
        self.checkpoint_callbacks = [ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)]


def test_resolve_ckpt_path_picks_the_most_advanced_checkpoint(tmp_path: Path) -> None:
    t = _FakeTrainer(tmp_path)
    assert resolve_ckpt_path(None, t) is None and resolve_ckpt_path("x.ckpt", t) == "x.ckpt"
    assert resolve_ckpt_path("auto", t) is None  # nothing yet: fresh start
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 10}, last)
    assert resolve_ckpt_path("auto", t) == str(last)
    torch.save({"global_step": 10}, tmp_path / "hpc_ckpt_1.ckpt")  # preempted at step 10: tie -> hpc
    assert resolve_ckpt_path("auto", t) == str(tmp_path / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 30}, last)  # resumed run went further
    assert resolve_ckpt_path("auto", t) == str(last)
    torch.save({"global_step": 30}, tmp_path / "hpc_ckpt_2.ckpt")
    assert resolve_ckpt_path("auto", t) == str(tmp_path / "hpc_ckpt_2.ckpt")


# -- templates with a stub srun -----------------------------------------------------------------------
def _stub_bin(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    b.mkdir(parents=True)
    (b / "srun").write_text('#!/bin/sh\necho "SRUN $*"\n')
    (b / "srun").chmod(0o755)
    return b


def _run_template(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PATH=f"{_stub_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}", PPD_PYTHON="echo")
    full.update(SLURM_SUBMIT_DIR=str(ROOT), **env)
    return subprocess.run(["bash", str(SLURM / script), *args], env=full, capture_output=True, text=True)


def test_fit_template_runs_cache_step_then_ddp_fit_with_auto_resume(tmp_path: Path) -> None:
    p = _run_template(tmp_path, "fit.sbatch", "configs/quickstart.yaml", "--model.init_args.lr=1e-4")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SRUN")]
    assert lines == [
        "SRUN --ntasks=1 --nodes=1 echo -m ppd.cache --config configs/quickstart.yaml --quiet",
        "SRUN echo -m ppd.fit --config configs/quickstart.yaml --config configs/trainer/slurm_ddp.yaml"
        " --ckpt_path auto --model.init_args.lr=1e-4",
    ]
    p = _run_template(tmp_path / "b", "fit.sbatch", "configs/quickstart.yaml", PPD_FILL_CACHE="0")
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("SRUN")][0].startswith("SRUN echo -m ppd.fit")


@pytest.mark.parametrize("script", ["fit.sbatch", "cache_array.sbatch"])
def test_templates_reject_a_missing_config(tmp_path: Path, script: str) -> None:
    p = _run_template(tmp_path, script, "configs/nope.yaml")
    assert p.returncode == 2 and "usage:" in p.stderr


def test_cache_array_template_maps_array_tasks_to_shards(tmp_path: Path) -> None:
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}
    p = _run_template(tmp_path, "cache_array.sbatch", "configs/quickstart.yaml", "cache.device=cuda", **env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == (
        "-m ppd.cache --config configs/quickstart.yaml --shard 3/4 --quiet cache.device=cuda"
    )


def test_every_template_requeues_and_appends_its_log() -> None:
    for name in ("fit.sbatch", "ppd_ddp_cpu_test.sbatch"):
        text = (SLURM / name).read_text()
        for directive in ("--signal=SIGUSR1@", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {directive}" in text, (name, directive)


def test_multi_node_preset_takes_nodes_and_gpus_from_slurm(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    cli = build_cli(
        [
            "--config",
            "configs/quickstart.yaml",
            "--config",
            "configs/trainer/slurm_ddp.yaml",
            "--trainer.accelerator=cpu",  # no GPU here; the numbers are what matters
        ]
    )
    assert cli.trainer.num_nodes == 2 and cli.trainer.num_devices == 4
    assert cli.trainer.world_size == 8


# -- W&B --------------------------------------------------------------------------------------------
def test_wandb_logger_preset_is_online_and_reads_the_environment(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    text = (ROOT / "configs" / "logger" / "wandb.yaml").read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "api_key" not in body and "WANDB_API_KEY" not in body
    monkeypatch.setenv("WANDB_PROJECT", "proj-x")
    monkeypatch.setenv("WANDB_ENTITY", "team-y")
    cli = build_cli(["--config", "configs/quickstart.yaml", "--config", "configs/logger/wandb.yaml"])
    wb = next(lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger))
    csv = next(lg for lg in cli.trainer.loggers if isinstance(lg, CSVLogger))
    init = wb._wandb_init
    assert init["project"] == "proj-x" and init["entity"] == "team-y" and init["name"] == "quickstart"
    assert wb._offline is False
    run_dir = cli_env / "runs" / "quickstart"
    assert Path(wb.save_dir) == run_dir and Path(csv.save_dir) == run_dir


def test_sweep_runs_ppd_fit_and_every_parameter_is_a_ppd_fit_option(cli_env: Path) -> None:
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    cmd = sweep["command"]
    assert cmd[cmd.index("-m") + 1] == "ppd.fit" and cmd[-1] == "${args}"
    # the selection metric is one the task logs (its validation metrics are built in ppd.rl.validation)
    logged = (ROOT / "ppd" / "tasks" / "ppd.py").read_text() + (
        ROOT / "ppd" / "rl" / "validation.py"
    ).read_text()
    assert f'"{sweep["metric"]["name"]}"' in logged
    # hyper-parameters are chosen on the dev split, never on the reported val split
    assert "--data.init_args.val.split=experiments/splits/cvc_clinicdb_train_dev_every8.txt" in cmd
    fixed = [c for c in cmd[cmd.index("ppd.fit") + 1 : -1]]
    for extreme in (0, -1):
        args = []
        expect = {}
        for name, spec in sweep["parameters"].items():
            if "values" in spec:
                v = spec["values"][extreme]
            else:
                assert spec["distribution"] in ("log_uniform_values", "uniform", "int_uniform", "q_uniform")
                v = spec["min"] if extreme == 0 else spec["max"]
            args.append(f"--{name}={v}")  # how `wandb agent` formats ${args}
            expect[name] = v
        cli = build_cli([*fixed, *args])
        for name, v in expect.items():
            node = cli.config
            for part in name.split("."):
                node = node[part]
            got = list(node) if isinstance(node, tuple | list) else node
            assert got == v, (name, got, v)
        assert cli.datamodule.val_cfg.split.endswith("cvc_clinicdb_train_dev_every8.txt")


def test_sweep_agent_runs_get_their_own_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ppd.fit

    seen = {}

    def fake_build(args: list[str] | None = None, **kw: object) -> None:
        seen["runs"] = os.environ["PPD_RUNS"]
        raise SystemExit(0)

    monkeypatch.setattr(ppd.fit, "build_cli", fake_build)
    monkeypatch.setenv("PPD_RUNS", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    with pytest.raises(SystemExit):
        ppd.fit.main([])
    assert seen["runs"] == str(tmp_path / "sweeps" / "sw1" / "run7")
