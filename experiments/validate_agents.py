"""Trained vs random agents on a config's validation images, for one checkpoint.

::

    DATA_ROOT=../shared/data python experiments/validate_agents.py \
        --config configs/ppd_cvc_cpu.yaml --ckpt runs/ppd_cvc_cpu/checkpoints/last.ckpt [--val-steps 10]

Builds the config exactly as ``python -m ppd.fit`` does, restores the checkpoint and runs Lightning's
``validate``: on every validation image the trained attacker acts on the ideal prompts for ``--val-steps``
activations and a random attacker takes the same number; the trained defender then deactivates (up to
``--val-steps``, stopping early when its best Q-value is <= 0) and a random defender takes as many
deactivations as it did. Prints the per-image means (``val/attack_drop`` vs ``val/random_attack_drop``,
``val/defense_gain`` vs ``val/random_defense_gain``) and the number of images. No logger, no checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--val-steps", type=int, default=None, help="override val_attack_steps/val_defend_steps")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from ppd.fit import build_cli

    extra = ["--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    if a.val_steps is not None:
        extra += [
            f"--model.init_args.val_attack_steps={a.val_steps}",
            f"--model.init_args.val_defend_steps={a.val_steps}",
        ]
    cli = build_cli(["--config", a.config, *extra])
    state = torch.load(a.ckpt, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(state["state_dict"])
    out = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    n = len(cli.datamodule.val_env)
    print(f"checkpoint {a.ckpt}: {n} validation images, per-image means")
    for k in sorted(out):
        print(f"  {k:28s} {out[k]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
