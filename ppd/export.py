"""``python -m ppd.export CKPT OUT``: write a small defender-only file from a training checkpoint.

The file holds the defender Q-network weights, its constructor arguments and the graph/feature set-up it
was trained with (grid, k, DINOv2 model and resolution, SAM variant), so inference needs neither Lightning
state nor the training config. Load it with :func:`load_defender`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ppd.models.qnet import QNetwork

FORMAT = "ppd-defender-v1"
QNET_KEYS = ("hidden", "layers", "heads", "conv")


def export_defender(ckpt_path: str | Path, out_path: str | Path, overwrite: bool = False) -> Path:
    """Extract the defender from a PPD training checkpoint.

    Args:
        ckpt_path: Lightning checkpoint written by ``python -m ppd.fit`` with ``PPDTask``.
        out_path: destination file (written atomically).
        overwrite: replace an existing file.

    Returns:
        The written path.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "ppd" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a PPDTask checkpoint (no 'ppd' section)")
    hp = ckpt.get("hyper_parameters", {})
    qnet_cfg = {"in_dim": int(hp["feature_dim"]), "out_per_node": 1, **{k: hp[k] for k in QNET_KEYS}}
    state = {k[len("q_def.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("q_def.")}
    payload = {
        "format": FORMAT,
        "qnet_config": qnet_cfg,
        "env_config": ckpt["ppd"]["env_config"],
        "state_dict": state,
        "trained": {"episodes": int(ckpt["ppd"]["episode"]), "env_steps": int(ckpt["ppd"]["env_steps"])},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def load_defender(path: str | Path) -> tuple[QNetwork, dict[str, Any]]:
    """Load an exported defender (or a training checkpoint, which is exported on the fly in memory).

    Returns:
        ``(qnet in eval mode, env_config)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"defender file {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        if "ppd" in payload:
            with tempfile.TemporaryDirectory() as d:
                return load_defender(export_defender(path, Path(d) / "defender.pt"))
        raise ValueError(f"{path} is neither an exported defender ({FORMAT}) nor a PPD checkpoint")
    qnet = QNetwork(**payload["qnet_config"])
    qnet.load_state_dict(payload["state_dict"])
    return qnet.eval(), dict(payload["env_config"])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m ppd.export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="training checkpoint (.ckpt)")
    p.add_argument("out", help="output defender file (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    out = export_defender(a.ckpt, a.out, overwrite=a.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
