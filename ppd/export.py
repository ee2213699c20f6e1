"""``python -m ppd.export CKPT OUT``: write a small defender-only file from a training checkpoint.

The file holds the defender Q-network weights, its constructor arguments and the graph/feature set-up it
was trained with (grid, k, DINOv2 model and resolution, SAM variant), so inference needs neither Lightning
state nor the training config. Load it with :func:`load_defender` (a :class:`~ppd.rl.agent.DQNAgent` on the
dense Q path; the file format is unchanged, so defenders exported before load as they are).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ppd.env.roles import ATTACK, DEFEND, Role
from ppd.io import atomic_torch_save
from ppd.models.qnet_dense import DenseQNetwork
from ppd.rl.agent import DQNAgent

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
    ckpt = _torch_load(ckpt_path, "checkpoint")
    if not isinstance(ckpt, dict) or "ppd" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a PPDTask checkpoint (expected 'ppd' and 'state_dict' entries)")
    hp = ckpt.get("hyper_parameters", {})
    missing = [k for k in ("feature_dim", *QNET_KEYS) if k not in hp]
    for key in ("env_config", "episode", "env_steps"):
        if key not in ckpt["ppd"]:
            missing.append(f"ppd.{key}")
    state = {k[len("q_def.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("q_def.")}
    if not state:
        missing.append("state_dict.q_def.*")
    if missing:
        raise ValueError(f"{ckpt_path}: PPDTask checkpoint lacks {missing}")
    qnet_cfg = {"in_dim": int(hp["feature_dim"]), "out_per_node": 1, **{k: hp[k] for k in QNET_KEYS}}
    payload = {
        "format": FORMAT,
        "qnet_config": qnet_cfg,
        "env_config": ckpt["ppd"]["env_config"],
        "state_dict": state,
        "trained": {"episodes": int(ckpt["ppd"]["episode"]), "env_steps": int(ckpt["ppd"]["env_steps"])},
    }
    atomic_torch_save(payload, out_path)
    return out_path


def _read_dict(path: Path, what: str) -> dict[str, Any]:
    """A torch file holding a dict; one-line errors for a missing, unreadable or foreign file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    payload = _torch_load(path, what)
    if not isinstance(payload, dict):
        raise ValueError(
            f"{what} {path} holds a {type(payload).__name__}, not a ppd defender or PPD checkpoint"
        )
    return payload


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for a file that is not a torch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many types (UnpicklingError, EOFError, RuntimeError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what} {path} cannot be read as a torch checkpoint ({first})") from err


def _agent(role: Role, qnet_config: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> DQNAgent:
    """An eval-mode :class:`DQNAgent` of ``role`` on a :class:`DenseQNetwork` with these weights (its target
    is the same network: loaded agents act, they do not learn)."""
    net = DenseQNetwork(**qnet_config)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{what}: weights do not fit its qnet_config ({str(err).splitlines()[0]})") from err
    return DQNAgent(role, net, target=net).eval()


def load_defender(path: str | Path) -> tuple[DQNAgent, dict[str, Any]]:
    """Load an exported defender (or a training checkpoint, which is exported on the fly in memory).

    Returns:
        ``(defender agent in eval mode, env_config)``; ``agent.online`` is the Q-network.
    """
    path = Path(path)
    payload = _read_dict(path, "defender file")
    if payload.get("format") != FORMAT:
        if "ppd" in payload:
            with tempfile.TemporaryDirectory() as d:
                return load_defender(export_defender(path, Path(d) / "defender.pt"))
        raise ValueError(f"{path} is neither an exported defender ({FORMAT}) nor a PPD checkpoint")
    missing = [k for k in ("qnet_config", "state_dict", "env_config") if k not in payload]
    if missing:
        raise ValueError(f"defender file {path} lacks {missing}")
    agent = _agent(DEFEND, payload["qnet_config"], payload["state_dict"], f"defender file {path}")
    return agent, dict(payload["env_config"])


def load_attacker(path: str | Path) -> tuple[DQNAgent, dict[str, Any]]:
    """The attacker of a PPD training checkpoint.

    Returns:
        ``(attacker agent in eval mode, env_config or {})``; ``agent.online`` is the Q-network.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no attacker (e.g. an exported defender-only file).
    """
    path = Path(path)
    ckpt = _read_dict(path, "attacker checkpoint")
    state = {k[len("q_att.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("q_att.")}
    if not state:
        raise ValueError(f"{path} holds no attacker ('q_att.*' weights); give a PPD training checkpoint")
    hp = ckpt.get("hyper_parameters", {})
    if "feature_dim" not in hp:
        raise ValueError(f"{path}: hyper_parameters lack 'feature_dim'; give a PPD training checkpoint")
    cfg = {"in_dim": int(hp["feature_dim"]), "out_per_node": 2, **{k: hp[k] for k in QNET_KEYS if k in hp}}
    agent = _agent(ATTACK, cfg, state, f"attacker checkpoint {path}")
    return agent, dict(ckpt.get("ppd", {}).get("env_config") or {})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m ppd.export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="training checkpoint (.ckpt)")
    p.add_argument("out", help="output defender file (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    try:
        out = export_defender(a.ckpt, a.out, overwrite=a.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
