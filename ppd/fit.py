"""``python -m ppd.fit --config configs/X.yaml``: train a task through LightningCLI.

The config names the ``model`` (a LightningModule such as :class:`ppd.tasks.ppd.PPDTask`), the ``data``
module and the ``trainer`` (strategy, devices, loggers, callbacks). It is read in omegaconf mode, so
``${...}`` interpolation works, and saved beside the checkpoints. W&B runs offline unless ``WANDB_MODE`` is
set otherwise. ``--ckpt_path PATH`` resumes training; ``--ckpt_path auto`` resumes from the most advanced
checkpoint of the run if there is one (see :func:`resolve_ckpt_path`; what the SLURM templates pass, so a
requeued or resubmitted job continues). Under SLURM, :class:`ppd.callbacks.SlurmRequeue` turns the
``--signal=SIGUSR1@N`` warning into a step-boundary checkpoint + ``scontrol requeue``.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ppd.callbacks import SlurmRequeue


class PPDCLI(LightningCLI):
    """LightningCLI with the DataModule's feature width linked into the model and a resume option."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from; 'auto': the run's most advanced checkpoint, if any",
        )
        parser.add_argument("--run_name", type=str, default="ppd", help="run name (interpolated in configs)")
        parser.add_argument(
            "--data_root", type=str | None, default=None, help="data folder (interpolated in configs)"
        )
        parser.link_arguments("data.feature_dim", "model.init_args.feature_dim", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Loggers that leave ``name`` / ``save_dir`` unset get the run's (``run_name``, ``default_root_dir``).

        A logger preset given as a second ``--config`` (``configs/logger/wandb.yaml``) cannot interpolate the
        first file's ``${run_name}``; this fills the gap, so its runs land beside the checkpoints.
        """
        cfg = self.config
        trainer = cfg.get("trainer")
        loggers = trainer.get("logger") if trainer is not None else None
        if not isinstance(loggers, list):
            loggers = [loggers] if loggers is not None and not isinstance(loggers, bool) else []
        for lg in loggers:
            init = lg.get("init_args") if hasattr(lg, "get") else None
            if init is None:
                continue
            cls = str(lg.get("class_path", ""))
            if cls.endswith("WandbLogger") and init.get("name") is None:
                init["name"] = cfg.get("run_name")
            if init.get("save_dir", ".") is None or (
                cls.endswith("WandbLogger") and init.get("save_dir") == "."
            ):
                if trainer.get("default_root_dir"):
                    init["save_dir"] = trainer.get("default_root_dir")


def build_cli(args: list[str] | None = None) -> PPDCLI:
    """Parse ``args`` and instantiate model, data module and trainer exactly as ``python -m ppd.fit`` does."""
    return PPDCLI(
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [SlurmRequeue()]},
        args=args,
    )


def _global_step(path: str) -> int:
    """``global_step`` stored in a Lightning checkpoint (memory-mapped load: cheap for large files)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", -1))


def resolve_ckpt_path(value: str | None, trainer: L.Trainer) -> str | None:
    """Resolve ``--ckpt_path``: ``auto`` -> the run's most advanced checkpoint (``None`` if none yet).

    Candidates: the preemption checkpoints ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and ``last.ckpt`` of every
    ``ModelCheckpoint(save_last=True)``. The one with the highest ``global_step`` wins; on a tie a preemption
    checkpoint wins (it was taken at a step boundary inside the epoch, so the resumed run replays the rest of
    that epoch; a ``last.ckpt`` rewritten when training stopped may mark the epoch as finished), and among
    those the highest ``n``. Any other value is returned unchanged.
    """
    if value != "auto":
        return value
    cands: list[tuple[int, int, int, str]] = []
    for p in glob.glob(os.path.join(str(trainer.default_root_dir), "hpc_ckpt_*.ckpt")):
        num = Path(p).stem.removeprefix("hpc_ckpt_")
        if num.isdigit():
            cands.append((_global_step(p), 1, int(num), p))
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "save_last", False) and getattr(cb, "dirpath", None):
            p = os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
            if os.path.isfile(p):
                cands.append((_global_step(p), 0, 0, p))
    return max(cands)[3] if cands else None


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    os.environ.setdefault("WANDB_MODE", "offline")
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run:  # started by `wandb agent`: one run folder per sweep run (checkpoints never collide)
        os.environ["PPD_RUNS"] = os.path.join(os.environ.get("PPD_RUNS", "runs"), "sweeps", sweep, run)
    # PPDTask uses manual optimisation on purpose; its checkpoints are taken after the optimiser step,
    # together with the matching step/episode counters, which is exactly what an exact resume needs.
    # Lightning's advice to stash pre-step weights does not apply here, so its 15-line warning is dropped.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    cli = build_cli(args)
    ckpt = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer)
    if ckpt is not None:
        print(f"ppd.fit: resuming from {ckpt}", file=sys.stderr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
