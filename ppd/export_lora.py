"""``python -m ppd.export_lora CKPT OUT``: write the LoRA adapter of a SAMPO checkpoint to a small file.

``python -m ppd.export_lora --info ADAPTER`` checks an adapter file and prints what it holds. The adapter
is loaded for evaluation with :func:`ppd.models.lora.apply_adapter` (eval configs:
``checkpoints: {sampo: ADAPTER}``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ppd.models.lora import AdapterError, load_adapter


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Load a :class:`ppd.tasks.sampo.SAMPOTask` checkpoint and write its adapter to ``out`` (atomic)."""
    from ppd.tasks.sampo import SAMPOTask

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise AdapterError(f"checkpoint {ckpt} does not exist")
    with warnings.catch_warnings():  # the checkpoint holds the LoRA weights only, by design
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
        task = SAMPOTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    return task.export_adapter(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on a bad file, with a one-line message)."""
    p = argparse.ArgumentParser(prog="python -m ppd.export_lora", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?", help="SAMPOTask Lightning checkpoint (.ckpt)")
    p.add_argument("out", nargs="?", help="adapter file to write")
    p.add_argument("--info", metavar="ADAPTER", help="validate an adapter file and print its fields")
    a = p.parse_args(argv)
    try:
        if a.info:
            ad = load_adapter(a.info)
            n = sum(t.numel() for t in ad["state_dict"].values())
            print(
                f"{a.info}: SAM {ad['sam_variant']}, parts {ad.get('parts')}, rank {ad['rank']}, "
                f"{len(ad['target_modules'])} layers, {n} LoRA parameters, meta {ad.get('meta')}"
            )
            return 0
        if not (a.ckpt and a.out):
            p.error("give CKPT and OUT, or --info ADAPTER")
        path = export_checkpoint(a.ckpt, a.out)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return 0
    except AdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
