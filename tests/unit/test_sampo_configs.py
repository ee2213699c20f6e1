"""Every ``configs/sampo_*.yaml`` builds through PPDCLI (no data or weights read); the quick start runs
``fast_dev_run`` on the tiny random SAM and synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ppd.fit import build_cli
from tests.helpers.synthetic import write_folder_dataset

ROOT = Path(__file__).resolve().parents[2]
SAMPO_CONFIGS = sorted((ROOT / "configs").glob("sampo_*.yaml"))


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    yield tmp_path


def test_all_sampo_configs_present() -> None:
    names = {p.stem for p in SAMPO_CONFIGS}
    assert {"sampo_quickstart", "sampo_ph2", "sampo_cvc", "sampo_drive_nuclei", "sampo_gpu_vitb"} <= names


@pytest.mark.parametrize("path", SAMPO_CONFIGS, ids=lambda p: p.stem)
def test_sampo_config_builds(path: Path, env: Path) -> None:
    from ppd.data.segmentation import SegmentationDataModule
    from ppd.tasks.sampo import SAMPOTask

    raw = yaml.safe_load(path.read_text())
    extra = (
        ["--trainer.accelerator=cpu", "--trainer.precision=32"]
        if raw["trainer"]["accelerator"] == "gpu"
        else []
    )
    cli = build_cli(["--config", str(path), *extra])
    task, dm = cli.model, cli.datamodule
    assert isinstance(task, SAMPOTask) and isinstance(dm, SegmentationDataModule)
    assert task.peft is None and dm.train_data is None, "building must not read weights or data"
    assert cli.config["run_name"] == raw["run_name"]
    assert Path(cli.trainer.default_root_dir).resolve().is_relative_to((env / "runs").resolve())
    hp = task.hparams
    assert hp.max_pos <= 3 and hp.max_neg <= 3 and list(hp.val_points) == [3, 3]
    for cfg in (dm.train_cfg, dm.val_cfg):
        root = Path(cfg.root)
        assert root.is_relative_to(env / "data") or (ROOT / root).is_dir(), cfg.root
        if isinstance(cfg.split, str) and not cfg.split.startswith(str(env)):
            assert (ROOT / cfg.split).is_file(), f"{path.name}: split file {cfg.split} missing"
    if path.stem == "sampo_gpu_vitb":  # the paper's settings
        assert hp.sam_variant == "vit_b" and hp.lora_rank == 64 and "image_encoder" in hp.lora_parts
        assert hp.lr == 3e-4 and hp.weight_decay == 0.01 and dm.batch_size == 14
        assert cli.config["trainer"]["max_epochs"] == 10 and dm.cache_embeddings is False
    else:
        assert hp.sam_variant == "vit_t" and dm.cache_embeddings is True


@pytest.mark.slow
def test_quickstart_fast_dev_run_tiny(env: Path) -> None:
    tr = write_folder_dataset(env / "tr", n=3, seed=1)
    va = write_folder_dataset(env / "va", n=2, seed=2)
    cli = build_cli(
        [
            "--config", str(ROOT / "configs" / "sampo_quickstart.yaml"),
            "--model.init_args.sam_variant=tiny",
            "--model.init_args.n_prompt_sets=2",
            "--data.init_args.cache.sam_variant=tiny", "--data.init_args.cache.dino_name=tiny",
            "--data.init_args.cache.dino_resolution=112",
            f"--data.init_args.train.root={tr}", f"--data.init_args.val.root={va}",
            "--trainer.fast_dev_run=true",
        ]
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    m = cli.trainer.callback_metrics
    assert "train/loss" in m and "val/mdsc" in m and "val/mdsc_ref" in m, sorted(m)
