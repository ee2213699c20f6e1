"""``SlurmRequeue`` in one process: SIGUSR1 mid-run -> hpc checkpoint at a step boundary, stop, requeue call;
``--ckpt_path auto`` resumes from it and the run ends bit-identical to an uninterrupted one.

The SLURM job environment is faked with variables (so Lightning picks ``SLURMEnvironment``) and
``scontrol`` is a stub on ``PATH`` that records its arguments; the real cluster test is test_slurm.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ppd.callbacks import SlurmRequeue
from ppd.fit import PPDCLI, build_cli, resolve_ckpt_path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"
COMMON = ("--trainer.max_epochs=2", "--data.init_args.save_buffers=true")


@pytest.fixture()
def slurm_job_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (stub / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    for k, v in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ppd_fit",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path.parent / "ppd_tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    yield tmp_path
    import wandb

    wandb.finish()


def _fit(*extra: str) -> PPDCLI:
    cli = build_cli(["--config", str(TINY), *COMMON, *extra])
    ckpt = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return cli


def _state(cli: PPDCLI) -> tuple:
    m = cli.model
    return cli.trainer.global_step, m.env_steps, m.episode, m.epsilon, dict(m.grad_steps), m.transitions


def test_usr1_checkpoints_at_a_step_boundary_requeues_and_resumes_exactly(slurm_job_env: Path) -> None:
    tmp = slurm_job_env
    from lightning.fabric.plugins.environments import SLURMEnvironment

    assert SLURMEnvironment.detect()
    full = _fit()
    ref = _state(full)
    ref_weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    assert not (tmp / "scontrol.calls").exists()  # no signal, no requeue

    os.environ["PPD_RUNS"] = str(tmp / "runs_pre")
    signal_at = json.dumps({"class_path": "tests.helpers.callbacks.SignalAt", "init_args": {"step": 5}})
    pre = _fit(f"--trainer.callbacks+={signal_at}")
    cb = next(c for c in pre.trainer.callbacks if isinstance(c, SlurmRequeue))
    run = tmp / "runs_pre" / "tiny"
    hpc = run / "hpc_ckpt_1.ckpt"
    assert cb.saved_path == str(hpc) and hpc.is_file()
    assert pre.trainer.global_step == 5 < ref[0]  # stopped right after the signalled step
    assert (tmp / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5 and saved["ppd"]["env_steps"] == pre.model.env_steps

    # the requeued job: same command, --ckpt_path auto must pick the preemption checkpoint (last.ckpt was
    # rewritten at the stop with the same step; the tie goes to hpc_ckpt_1)
    resumed_cli = build_cli(["--config", str(TINY), *COMMON, "--ckpt_path=auto"])
    assert resolve_ckpt_path("auto", resumed_cli.trainer) == str(hpc)
    resumed_cli.trainer.fit(resumed_cli.model, datamodule=resumed_cli.datamodule, ckpt_path=str(hpc))
    assert _state(resumed_cli) == ref
    for k, v in resumed_cli.model.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], msg=f"weights differ after requeue: {k}")
