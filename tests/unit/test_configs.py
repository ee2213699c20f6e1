"""Every YAML under ``configs/`` is parsed and instantiated (training configs) or validated (eval configs).

Rules (a file that no rule covers fails :func:`test_every_config_is_covered_by_a_rule`):

* ``configs/trainer/*.yaml`` -- trainer presets, combined with ``configs/quickstart.yaml`` as a second
  ``--config`` and instantiated through :class:`ppd.fit.PPDCLI`;
* ``configs/logger/*.yaml`` -- logger presets, combined with ``configs/quickstart.yaml`` like trainer presets
  (details of the W&B preset: tests/unit/test_cluster.py);
* ``configs/eval/*.yaml`` -- evaluation configs, loaded with :func:`ppd.eval.load_config`;
* any other YAML with ``model:`` and ``data:`` -- training configs, instantiated through ``PPDCLI``.

Instantiation never reads data or weights (the DataModule only touches the data in ``setup()``), so the
paper configs work without ``../shared`` (``DATA_ROOT`` points at an empty tmp folder). The quick-start
config is also run end to end with ``fast_dev_run`` on random tiny encoders and tiny budgets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ppd.fit import PPDCLI, build_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))

#: overrides that turn the quick-start config into a seconds-long CPU run on random tiny encoders
TINY_OVERRIDES = (
    "--data.init_args.cache.sam_variant=tiny",
    "--data.init_args.cache.dino_name=tiny",
    "--data.init_args.cache.dino_resolution=112",
    "--data.init_args.train.limit=4",
    "--data.init_args.val.limit=2",
    "--data.init_args.grid=8",
    "--data.init_args.k_feature=4",
    "--data.init_args.k_physical=4",
    "--data.init_args.envs_per_rank=2",
    "--data.init_args.budget_range=[2, 3]",
    "--data.init_args.warm_start_steps=8",
    "--data.init_args.batch_size=8",
    "--data.init_args.buffer_capacity=200",
    "--model.init_args.hidden=16",
    "--model.init_args.val_attack_steps=2",
    "--model.init_args.val_defend_steps=2",
)


def classify(path: Path) -> str | None:
    """Which rule covers a config file: ``"trainer"``, ``"logger"``, ``"eval"``, ``"train"`` or ``None``."""
    rel = path.relative_to(CONFIGS)
    if rel.parts[0] == "trainer" and len(rel.parts) == 2:
        return "trainer"
    if rel.parts[0] == "logger" and len(rel.parts) == 2:
        return "logger"
    if rel.parts[0] == "eval" and len(rel.parts) == 2:
        return "eval"
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "model" in data and "data" in data:
        return "train"
    return None


def _of(kind: str) -> list[Path]:
    return [p for p in ALL_CONFIGS if classify(p) == kind]


def _id(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


@pytest.fixture()
def cfg_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Runs/cache/data roots in tmp, offline W&B, SLURM allocation variables of a 2-GPU node."""
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("DEFENDER", str(tmp_path / "defender.pt"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.chdir(ROOT)
    yield tmp_path
    import wandb

    wandb.finish()


def _cli(*args: str) -> PPDCLI:
    """Parse and instantiate exactly like ``python -m ppd.fit`` (see ``ppd.fit.main``)."""
    return build_cli(list(args))


def _check_instantiated(cli: PPDCLI, tmp: Path) -> None:
    from ppd.data.replay import FEATURE_DIMS, ReplayDataModule
    from ppd.tasks.ppd import PPDTask

    if not isinstance(cli.model, PPDTask):  # other tasks (baselines) check their specifics in their own tests
        _check_generic(cli, tmp)
        return
    assert isinstance(cli.model, PPDTask)
    assert isinstance(cli.datamodule, ReplayDataModule)
    dm = cli.datamodule
    # feature width linked from the DataModule into the model
    assert cli.model.hparams.feature_dim == FEATURE_DIMS[dm.cache_cfg.dino_name] + 5 == dm.feature_dim
    assert dm.env is None, "instantiation must not set the DataModule up (no data read)"
    lo, hi = dm.budget_range
    assert 1 <= lo <= hi
    assert dm.batch_size <= dm.buffer_capacity
    # everything the run writes goes under $PPD_RUNS
    assert Path(cli.trainer.default_root_dir).resolve().is_relative_to((tmp / "runs").resolve())


def _check_generic(cli: PPDCLI, tmp: Path) -> None:
    """Any LightningModule/DataModule pair: built without reading data, writes under ``$PPD_RUNS``."""
    import lightning as L

    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert Path(cli.trainer.default_root_dir).resolve().is_relative_to((tmp / "runs").resolve())


def test_every_config_is_covered_by_a_rule() -> None:
    assert ALL_CONFIGS, f"no YAML found under {CONFIGS}"
    uncovered = [_id(p) for p in ALL_CONFIGS if classify(p) is None]
    assert not uncovered, f"configs no test rule covers (add a rule to {__file__}): {uncovered}"
    covered = _of("train") + _of("trainer") + _of("logger") + _of("eval")
    assert sorted(covered) == ALL_CONFIGS
    assert QUICKSTART in _of("train")


@pytest.mark.parametrize("path", _of("train"), ids=_id)
def test_training_config_instantiates(path: Path, cfg_env: Path) -> None:
    cli = _cli("--config", str(path))
    _check_instantiated(cli, cfg_env)
    assert cli.config["run_name"] == yaml.safe_load(path.read_text())["run_name"]


@pytest.mark.parametrize("path", _of("trainer"), ids=_id)
def test_trainer_preset_instantiates_with_quickstart(path: Path, cfg_env: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    preset = yaml.safe_load(path.read_text())["trainer"]
    # no GPU here: a GPU preset is parsed as written (interpolations resolved), then built on CPU
    extra = ["--trainer.accelerator=cpu"] if preset.get("accelerator") == "gpu" else []
    cli = _cli("--config", str(QUICKSTART), "--config", str(path), *extra)
    for key, value in preset.items():
        if key != "accelerator" or not extra:
            got = cli.config["trainer"][key]
            assert str(got) == str(value) or isinstance(value, str) and "${" in value, (key, got, value)
    _check_instantiated(cli, cfg_env)
    t = cli.trainer
    if preset.get("strategy") == "ddp":
        assert isinstance(t.strategy, DDPStrategy)
        assert t.num_devices == 2  # from SLURM_NTASKS_PER_NODE
        assert t.num_nodes == 1  # from SLURM_JOB_NUM_NODES
    else:
        assert t.num_devices == int(preset.get("devices", 1))


@pytest.mark.parametrize("path", _of("logger"), ids=_id)
def test_logger_preset_instantiates_with_quickstart(path: Path, cfg_env: Path) -> None:
    preset = yaml.safe_load(path.read_text())["trainer"]["logger"]
    cli = _cli("--config", str(QUICKSTART), "--config", str(path))
    _check_instantiated(cli, cfg_env)
    want = [d["class_path"].rsplit(".", 1)[-1] for d in preset]
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == want


@pytest.mark.parametrize("path", _of("eval"), ids=_id)
def test_eval_config_validates(path: Path, cfg_env: Path) -> None:
    from ppd.eval import get_method, load_config

    cfg = load_config(path)
    assert cfg.methods and all(get_method(m).name == m for m in cfg.methods)
    assert cfg.datasets
    for pair in cfg.paired:
        assert len(pair) == 2 and set(pair) <= set(cfg.methods), f"{path}: paired {pair} not in methods"
    for ds in cfg.datasets:
        # bundled data must exist; external data resolves under $DATA_ROOT
        root = Path(ds.root)
        if not root.is_absolute():
            assert (ROOT / root).is_dir(), f"{path}: data set root {ds.root} does not exist"
        else:
            assert root.is_relative_to(cfg_env / "data"), f"{path}: {ds.root} ignores DATA_ROOT"


@pytest.mark.slow
def test_quickstart_fast_dev_run_tiny(cfg_env: Path) -> None:
    """``fast_dev_run`` (1 training + 1 validation batch) through the manual-optimisation PPDTask."""
    import wandb

    cli = _cli("--config", str(QUICKSTART), *TINY_OVERRIDES, "--trainer.fast_dev_run=true")
    assert cli.datamodule.cache_cfg.sam_variant == "tiny"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    wandb.finish()
    task = cli.model
    assert cli.trainer.global_step == 1  # one optimiser step of the attacker
    assert task.grad_steps == {"attack": 1, "defend": 0}
    assert task.env_steps == 1
    m = cli.trainer.callback_metrics
    assert "train/td_loss_att" in m and "val/attack_drop" in m, sorted(m)
    # Lightning 2.6 still writes last.ckpt under fast_dev_run: it must hold the task's own state
    import torch

    for ckpt in (cfg_env / "runs").rglob("*.ckpt"):
        st = torch.load(ckpt, map_location="cpu", weights_only=True)["ppd"]
        assert st["env_steps"] == 1 and st["env_config"]["dino_name"] == "tiny"
