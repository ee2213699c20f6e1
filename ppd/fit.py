"""``python -m ppd.fit --config configs/X.yaml``: train a task through LightningCLI.

The config names the ``model`` (a LightningModule such as :class:`ppd.tasks.ppd.PPDTask`), the ``data``
module and the ``trainer`` (strategy, devices, loggers, callbacks). It is read in omegaconf mode, so
``${...}`` interpolation works, and saved beside the checkpoints. W&B runs offline unless ``WANDB_MODE`` is
set otherwise. ``--ckpt_path last`` (or a path) resumes training.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class PPDCLI(LightningCLI):
    """LightningCLI with the DataModule's feature width linked into the model and a resume option."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume from")
        parser.add_argument("--run_name", type=str, default="ppd", help="run name (interpolated in configs)")
        parser.add_argument(
            "--data_root", type=str | None, default=None, help="data folder (interpolated in configs)"
        )
        parser.link_arguments("data.feature_dim", "model.init_args.feature_dim", apply_on="instantiate")


def build_cli(args: list[str] | None = None) -> PPDCLI:
    """Parse ``args`` and instantiate model, data module and trainer exactly as ``python -m ppd.fit`` does."""
    return PPDCLI(
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # PPDTask uses manual optimisation on purpose; its checkpoints are taken after the optimiser step,
    # together with the matching step/episode counters, which is exactly what an exact resume needs.
    # Lightning's advice to stash pre-step weights does not apply here, so its 15-line warning is dropped.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
