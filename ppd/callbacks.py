"""Training callbacks shared by every task: preemption-safe SLURM auto-requeue.

Why not Lightning's own auto-requeue (``SLURMEnvironment(auto_requeue=True)``)? Its SIGUSR1 handler calls
``trainer.save_checkpoint`` *inside the signal handler*, i.e. at whatever Python line each rank happens to be
on. With DDP that runs the checkpoint's collectives (the strategy barrier, ``PPDTask.on_save_checkpoint``'s
``all_gather``) on one rank while another rank is in the gradient all-reduce, and even on one process it can
save a half-done ``training_step`` (environment stepped, optimiser not), so the resumed counters are off by
one step. :class:`SlurmRequeue` only sets a flag in the handler; after the next complete training step every
rank agrees on the flag (one ``max`` all-reduce), all ranks save ``hpc_ckpt_<n>.ckpt`` in Lightning's
format and place, training stops, and rank 0 runs ``scontrol requeue $SLURM_JOB_ID``. The requeued job
resumes from that file (``python -m ppd.fit --ckpt_path auto``), exactly like the periodic checkpoints the
resume test checks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

log = logging.getLogger(__name__)


def job_id_for_requeue(environ: dict[str, str] | None = None) -> str:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` inside an array job, else ``SLURM_JOB_ID``.

    Raises:
        KeyError: not inside a SLURM job.
    """
    env = os.environ if environ is None else environ
    array = env.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


class SlurmRequeue(Callback):
    """On ``signal_name`` (SLURM's ``--signal=SIGUSR1@120``), checkpoint at a step boundary and requeue.

    Active only when the run is a SLURM job (``SLURMEnvironment.detect()``); elsewhere it does nothing.
    Installing its handler before the trainer registers its own (Lightning skips a signal that already has
    a handler) replaces Lightning's in-handler save.

    Args:
        signal_name: the requeue signal, as in ``sbatch --signal``.
        requeue: run ``scontrol requeue`` (``False``: checkpoint and stop only).
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        self.signum = signal.Signals[signal_name if signal_name.startswith("SIG") else f"SIG{signal_name}"]
        self.requeue = requeue
        self.received = False
        self.saved_path: str | None = None
        self._active = False
        self._previous: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect():
            return
        self._active = True
        self.received = False
        self._previous = signal.signal(self.signum, self._on_signal)
        log.info("SLURM job: %s checkpoints at the next step boundary and requeues", self.signum.name)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self.saved_path is not None:
            return
        flag = torch.tensor(1.0 if self.received else 0.0, device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if float(flag) <= 0:
            return
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # every rank (the hooks gather), rank 0 writes
        self.saved_path = path
        log.warning("requeue signal: saved %s at global step %d; stopping", path, trainer.global_step)
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._active:
            return
        signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._active = False
        if self.saved_path is None or not self.requeue or not trainer.is_global_zero:
            return
        job = job_id_for_requeue()
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode == 0:
            log.warning("requeued SLURM job %s (resume: --ckpt_path auto picks %s)", job, self.saved_path)
        else:
            log.error("scontrol requeue %s failed (%d): %s", job, proc.returncode, proc.stderr.strip())


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)`` with the trainer's current state.

    Lightning's ``ModelCheckpoint(save_last=True)`` only writes ``last.ckpt`` at the end of training if it
    never wrote one before, so a run that stops on ``max_episodes`` (mid-epoch, between two
    ``every_n_train_steps`` saves) would otherwise keep an older ``last.ckpt``. Rewriting it once at the end
    (``PPDTask.on_train_end``) is cheap and always right.
    """
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "save_last", False) and getattr(cb, "dirpath", None):
            trainer.save_checkpoint(os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"))
