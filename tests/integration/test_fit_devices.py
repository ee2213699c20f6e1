"""``python -m ppd.fit`` on every device this machine has, with the precisions users pick there.

CPU: 32-true and bf16-mixed; CUDA (only when present, see tests/unit/test_devices.py): 32-true, 16-mixed,
bf16-mixed with ``decoder_backend: torch`` (SAM's decoder then runs on the GPU beside the Q-networks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ppd.fit import build_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"
CASES = [("cpu", "32-true"), ("cpu", "bf16-mixed")]
if torch.cuda.is_available():
    CASES += [("cuda", "32-true"), ("cuda", "16-mixed"), ("cuda", "bf16-mixed")]


@pytest.fixture()
def run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path.parent / "ppd_tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    yield tmp_path
    import wandb

    wandb.finish()


@pytest.mark.slow
@pytest.mark.parametrize(("device", "precision"), CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_tiny_fit_on_device(run_env: Path, device: str, precision: str) -> None:
    cli = build_cli(
        [
            "--config",
            str(TINY),
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            f"--trainer.precision={precision}",
            "--trainer.max_steps=8",
            "--trainer.max_epochs=2",
            "--data.init_args.decoder_backend=torch",
        ]
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    task = cli.model
    assert cli.trainer.global_step == 8
    assert next(task.q_att.parameters()).device.type == device
    assert cli.datamodule.sam.device.type == device  # SAM decodes where the Q-networks run
    assert task.grad_steps["attack"] > 0 and task.env_steps == 8
    for key in ("train/td_loss_att", "val/defense_gain"):
        v = cli.trainer.callback_metrics[key]
        assert torch.isfinite(v), (key, v)
