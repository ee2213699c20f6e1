"""``python -m ppd.fit --config configs/X.yaml``: train a task through LightningCLI.

The config names the ``model`` (a LightningModule such as :class:`ppd.tasks.ppd.PPDTask`), the ``data``
module and the ``trainer`` (strategy, devices, loggers, callbacks). It is read in omegaconf mode, so
``${...}`` interpolation works, and saved beside the checkpoints. W&B runs offline unless ``WANDB_MODE`` is
set otherwise.

* ``--ckpt_path PATH`` resumes training (the file is checked before anything is built or written).
* ``--data_root DIR`` sets ``DATA_ROOT`` before the configs are read, so their
  ``${oc.env:DATA_ROOT,../shared/data}`` paths point at ``DIR`` (omegaconf resolves ``${...}`` while
  reading a file, before later flags apply, so the flag works through the environment).
* A run folder that already holds a run (``config.yaml`` or checkpoints) is never silently overwritten:
  resume it with ``--ckpt_path``, pass ``--overwrite``, or choose another ``--run_name``.

Input errors (missing data folders, an unreadable checkpoint, an occupied run folder) end in a one-line
message and exit code 2, before any logger, W&B run or file is created.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ppd.quiet import quiet_known_warnings


class FitInputError(ValueError):
    """A user input of ``python -m ppd.fit`` is wrong (the message names the field/file)."""


def _roots(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(field path, root)`` of every data set block (a mapping with a ``root``) under ``node``."""
    if hasattr(node, "as_dict"):  # jsonargparse Namespace (its items() are flattened keys)
        node = node.as_dict()
    if isinstance(node, dict):
        if isinstance(node.get("root"), str):
            yield f"{where}.root", node["root"]
        for k, v in node.items():
            if k != "root":
                yield from _roots(v, f"{where}.{k}")


def check_inputs(config: Any) -> None:
    """Validate a parsed fit config before anything is instantiated.

    Raises:
        FitInputError: a data folder does not exist, ``ckpt_path`` is missing or not a torch checkpoint, or
            the run folder already holds a run and neither resuming nor ``--overwrite`` was asked for.
    """
    data = config.get("data")
    for field, root in _roots(getattr(data, "init_args", None) or {}, "data.init_args"):
        if not Path(root).is_dir():
            raise FitInputError(
                f"{field}: data folder {root} does not exist (set DATA_ROOT or --data_root, or edit the config)"
            )
    ckpt = config.get("ckpt_path")
    if ckpt and ckpt not in ("last", "hpc", "best"):
        path = Path(ckpt)
        if not path.is_file():
            raise FitInputError(f"--ckpt_path {ckpt}: no such file")
        import torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling raises many types; the user needs the file and the reason
            raise FitInputError(
                f"--ckpt_path {ckpt}: not a readable Lightning checkpoint ({type(err).__name__})"
            ) from err
        if not isinstance(loaded, dict) or "state_dict" not in loaded:
            raise FitInputError(f"--ckpt_path {ckpt}: not a Lightning checkpoint (no 'state_dict')")
    root = config.get("trainer", {}).get("default_root_dir")
    if root and not ckpt and not config.get("overwrite"):
        run = Path(root)
        taken = [
            p
            for p in (run / "config.yaml", run / "checkpoints")
            if p.exists() and (p.is_file() or any(p.iterdir()))
        ]
        if taken:
            raise FitInputError(
                f"run folder {run} already holds a run ({taken[0]}); resume with --ckpt_path "
                f"{run / 'checkpoints' / 'last.ckpt'}, pass --overwrite, or choose another --run_name"
            )


class PPDCLI(LightningCLI):
    """LightningCLI with the DataModule's feature width linked into the model, resume and input checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume from")
        parser.add_argument("--run_name", type=str, default="ppd", help="run name (interpolated in configs)")
        parser.add_argument(
            "--data_root",
            type=str | None,
            default=None,
            help="data folder: sets DATA_ROOT for the configs' ${oc.env:DATA_ROOT,...} paths",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False, help="replace the run folder's config and checkpoints"
        )
        parser.link_arguments("data.feature_dim", "model.init_args.feature_dim", apply_on="instantiate")


class CheckedCLI(PPDCLI):
    """:class:`PPDCLI` that validates the inputs (:func:`check_inputs`) before instantiating anything."""

    def before_instantiate_classes(self) -> None:
        check_inputs(self.config)


def _apply_data_root(args: list[str] | None) -> list[str] | None:
    """Set ``DATA_ROOT`` from ``--data_root DIR`` / ``--data_root=DIR`` before the configs are parsed."""
    argv = list(sys.argv[1:] if args is None else args)
    for i, a in enumerate(argv):
        if a == "--data_root" and i + 1 < len(argv):
            os.environ["DATA_ROOT"] = argv[i + 1]
        elif a.startswith("--data_root="):
            os.environ["DATA_ROOT"] = a.split("=", 1)[1]
    return args


def build_cli(args: list[str] | None = None, checked: bool = False) -> PPDCLI:
    """Parse ``args`` and instantiate model, data module and trainer exactly as ``python -m ppd.fit`` does.

    Args:
        args: command-line arguments (``None`` = ``sys.argv[1:]``).
        checked: validate data folders, ``--ckpt_path`` and the run folder first (``ppd.fit`` does; tests
            that only build configs without data do not).
    """
    cls = CheckedCLI if checked else PPDCLI
    return cls(
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=_apply_data_root(args),
    )


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with a one-line message for a wrong input)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_known_warnings()  # known-harmless third-party warnings only, each with its reason (ppd.quiet)
    from ppd.data.datasets import DatasetError

    try:
        cli = build_cli(args, checked=True)
    except FitInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except DatasetError as err:  # a data set that exists but is malformed (found in setup)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
