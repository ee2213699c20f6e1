"""The SLURM templates on a real one-node ``slurm-wlm`` cluster this module starts and stops itself.

The cluster (``munged`` + ``slurmctld`` + ``slurmd``, see :mod:`tests.helpers.slurm`) lives in a private temp
folder and is torn down by pid at the end of the module, also when a test fails. Missing packages are
installed with ``apt-get`` when running as root (CI); otherwise the tests fail with the reason.

* the 2-task gloo-DDP CPU job (``experiments/slurm/ppd_ddp_cpu_test.sbatch`` -> ``fit.sbatch``) completes,
  ``sacct`` says COMPLETED 0:0, both ranks contributed transitions;
* preemption: ``scancel --signal=USR1`` mid-run -> :class:`ppd.callbacks.SlurmRequeue` writes
  ``hpc_ckpt_1.ckpt`` at a step boundary and requeues; the requeued run resumes from it (``--ckpt_path
  auto``) and ends with exactly the step / episode / epsilon counters of an uninterrupted run;
* the feature-cache array job splits a data set across array tasks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.slurm import LocalSlurm, SlurmError
from tests.helpers.system import MissingSystemPackage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CPU_TEST = ROOT / "experiments" / "slurm" / "ppd_ddp_cpu_test.sbatch"
CACHE_ARRAY = ROOT / "experiments" / "slurm" / "cache_array.sbatch"
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"
#: training is slowed down (wall clock only) so the signal lands while it runs
THROTTLE = json.dumps({"class_path": "tests.helpers.callbacks.Throttle", "init_args": {"seconds": 0.4}})


@pytest.fixture(scope="module")
def slurm() -> Iterator[LocalSlurm]:
    try:
        cluster = LocalSlurm(cpus=4, kill_wait=5)
    except MissingSystemPackage as e:
        pytest.fail(f"SLURM test needs slurm-wlm + munge: {e}")
    t0 = time.monotonic()
    cluster.start()
    print(f"\nlocal SLURM up in {time.monotonic() - t0:.1f} s under {cluster.root}")
    try:
        yield cluster
    finally:
        root = cluster.root
        cluster.stop()
        assert not cluster.alive(), f"daemons still running: {cluster.alive()}"
        assert not root.exists(), f"{root} left behind"


def _job_env(tmp: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PPD_RUNS=str(tmp / name),
        PPD_CACHE=str(tmp / "cache"),
        PPD_FILL_CACHE="1",
        PPD_PYTHON=sys.executable,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
    )
    return env


def _submit(
    slurm: LocalSlurm, tmp: Path, name: str, script: Path, *args: str, sbatch: tuple = (), log_id: str = "%j"
) -> str:
    log = tmp / f"{name}-{log_id}.out"
    return slurm.sbatch(
        [f"--output={log}", f"--error={log}", *sbatch, str(script), *args],
        cwd=ROOT,
        env=_job_env(tmp, name),
    )


def _log(tmp: Path, name: str, job: str) -> str:
    p = tmp / f"{name}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no log {p})"


def _wait_done(slurm: LocalSlurm, tmp: Path, name: str, job: str, timeout: float = 900) -> dict[str, str]:
    try:
        return slurm.wait(job, timeout)
    except SlurmError as e:
        raise AssertionError(f"{e}\n--- job log\n{_log(tmp, name, job)[-4000:]}") from e


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cpu_ddp_job_completes(slurm: LocalSlurm, tmp_path: Path) -> None:
    t0 = time.monotonic()
    job = _submit(slurm, tmp_path, "cpu", CPU_TEST)
    info = _wait_done(slurm, tmp_path, "cpu", job)
    wall = time.monotonic() - t0
    log = _log(tmp_path, "cpu", job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    rec = slurm.sacct(job)
    print(f"\n{slurm.sacct_text(job)}submit -> COMPLETED: {wall:.1f} s")
    assert rec and rec[-1]["State"] == "COMPLETED" and rec[-1]["ExitCode"] == "0:0", rec
    assert rec[-1]["NCPUS"] == "2", rec  # 2 tasks x 1 CPU
    assert "SLURM DDP CPU test OK" in log, log[-4000:]
    assert "restart 0" in log and "2 task(s)" in log, log[-4000:]
    ckpt = _ckpt(tmp_path / "cpu" / "tiny" / "checkpoints" / "last.ckpt")
    per_rank = ckpt["ppd"]["transitions_per_rank"]
    assert len(per_rank) == 2 and all(t > 0 for t in per_rank), per_rank
    assert (tmp_path / "cpu" / "tiny" / "config.yaml").is_file()


def test_preempted_job_is_requeued_and_resumes_exactly(slurm: LocalSlurm, tmp_path: Path) -> None:
    args = ("--trainer.max_epochs=4", f"--trainer.callbacks+={THROTTLE}")
    t0 = time.monotonic()
    ref = _submit(slurm, tmp_path, "ref", CPU_TEST, *args)
    pre = _submit(slurm, tmp_path, "pre", CPU_TEST, *args)
    run = tmp_path / "pre" / "tiny"
    # wait for the first periodic checkpoint (every 2 steps) of the run to preempt, then signal its steps
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "epoch=0-step=2.ckpt").exists():
        if slurm.job(pre).get("JobState") not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            raise AssertionError(
                f"job {pre} did not start training: {slurm.job(pre)}\n{_log(tmp_path, 'pre', pre)}"
            )
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", pre])
    t_signal = time.monotonic() - t0
    info = _wait_done(slurm, tmp_path, "pre", pre)
    _wait_done(slurm, tmp_path, "ref", ref)
    wall = time.monotonic() - t0
    log = _log(tmp_path, "pre", pre)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "1", info
    assert "restart 0" in log and "restart 1" in log, log[-6000:]  # both attempts appended to one log
    assert "requeued SLURM job" in log, log[-6000:]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert f"resuming from {hpc}" in log, log[-6000:]
    recs = slurm.sacct(pre)
    print(f"\n{slurm.sacct_text(pre)}{slurm.sacct_text(ref)}")
    # jobcomp/filetxt writes a record when the job leaves the node: the requeued attempt is logged with the
    # state it then has (PENDING, i.e. back in the queue), the second attempt as COMPLETED
    assert [r["State"] for r in recs] == ["PENDING", "COMPLETED"], recs
    assert recs[-1]["ExitCode"] == "0:0", recs

    at_signal = _ckpt(hpc)
    final = _ckpt(run / "checkpoints" / "last.ckpt")
    full = _ckpt(tmp_path / "ref" / "tiny" / "checkpoints" / "last.ckpt")
    s, f, r = at_signal["ppd"], final["ppd"], full["ppd"]
    print(
        f"signal after {t_signal:.1f} s; both jobs done after {wall:.1f} s\n"
        f"hpc_ckpt_1: global_step {at_signal['global_step']} episode {s['episode']} env_steps "
        f"{s['env_steps']} grad_steps {s['grad_steps']}\n"
        f"requeued:   global_step {final['global_step']} episode {f['episode']} env_steps {f['env_steps']} "
        f"grad_steps {f['grad_steps']} transitions {f['transitions_per_rank']}\n"
        f"reference:  global_step {full['global_step']} episode {r['episode']} env_steps {r['env_steps']} "
        f"grad_steps {r['grad_steps']} transitions {r['transitions_per_rank']}"
    )
    hp = final["hyper_parameters"]
    from ppd.rl.schedules import LinearSchedule

    sched = LinearSchedule(hp["epsilon_start"], hp["epsilon_end"], hp["epsilon_episodes"])
    print(
        f"Restarts={info['Restarts']}; epsilon at signal {sched.value(s['episode']):.4f}, requeued end "
        f"{sched.value(f['episode']):.4f}, reference end {sched.value(r['episode']):.4f}"
    )
    assert 2 <= at_signal["global_step"] < full["global_step"], "the signal must land mid-training"
    assert final["global_step"] == full["global_step"]
    for key in ("episode", "env_steps", "grad_steps", "transitions_per_rank"):
        assert f[key] == r[key], (key, f[key], r[key])
    # epsilon is a function of the episode counter and the (identical) schedule hyper-parameters
    assert full["hyper_parameters"]["epsilon_episodes"] == hp["epsilon_episodes"]
    assert sched.value(f["episode"]) == sched.value(r["episode"])


def test_cache_array_job_splits_the_data_set(slurm: LocalSlurm, tmp_path: Path) -> None:
    from ppd.data.config import DatasetConfig
    from ppd.data.features import FeatureCache, FeatureCacheConfig

    job = _submit(
        slurm,
        tmp_path,
        "cache",
        CACHE_ARRAY,
        str(TINY),
        sbatch=("--array=0-1", "--gres=none", "--mem=500M", "--cpus-per-task=1"),  # fit the test node
        log_id="%A_%a",
    )
    base = job.split("_")[0]
    deadline = time.monotonic() + 600
    while True:
        # array tasks are logged under their own job ids (see LocalSlurm.sacct): select them by name
        recs = [r for r in slurm.sacct(None) if r["JobName"] == "ppd_cache"]
        if len(recs) >= 2:
            break
        assert time.monotonic() < deadline, f"array job {base} not done: {recs}\n{slurm.job(job)}"
        time.sleep(1)
    print(f"\n{slurm.sacct_text(None)}")
    assert len(recs) == 2, recs
    assert all(r["State"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), recs
    logs = [(tmp_path / f"cache-{base}_{i}.out").read_text() for i in (0, 1)]
    # train: 4 images -> 2 + 2, val: 2 images -> 1 + 1; together every image is cached
    for i, text in enumerate(logs):
        assert f"examples/data/cvc_clinicdb shard {i}/2: 2 images" in text, text[-3000:]
        assert f"examples/data/ph2 shard {i}/2: 1 images" in text, text[-3000:]
    cache = FeatureCache(
        FeatureCacheConfig(
            sam_variant="tiny",
            dino_name="tiny",
            dino_resolution=112,
            root=str(tmp_path / "cache" / "features"),
        )
    )
    for ds in (
        DatasetConfig(root=str(ROOT / "examples/data/cvc_clinicdb"), kind="folder", limit=4),
        DatasetConfig(root=str(ROOT / "examples/data/ph2"), kind="folder", limit=2),
    ):
        built = ds.build()
        assert all(cache.contains(built[i].image) for i in range(len(built))), ds.root
