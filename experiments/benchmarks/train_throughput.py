"""PPD training throughput on the quick-start config: environment steps/s, gradient steps/s, step-time split.

    python experiments/benchmarks/train_throughput.py [--steps 48] [--tiny] [--config configs/quickstart.yaml]
        [--accelerator gpu] [--precision 16-mixed] [-- --data.init_args.decoder_backend=torch ...]

Builds the config's DataModule and :class:`ppd.tasks.ppd.PPDTask` exactly as ``python -m ppd.fit`` does
(:class:`ppd.fit.PPDCLI`), then trains them with a plain Lightning ``Trainer(max_steps=--steps)`` (no
logger, no checkpoints, no validation). Real MobileSAM + DINOv2-S/14 features by default (the feature
cache is filled before timing); ``--tiny`` uses random tiny encoders (no weights needed).

The task's ``act`` (one batched epsilon-greedy environment step, including the greedy attacker roll-out
at each defence start) and ``td_step`` are wrapped with timers; the rest of ``training_step`` (backward,
clipping, optimiser step, logging) is reported as "backward + optimiser". Within ``act`` the environment's
own timers (``env.timings``) split SAM decode, Dice, graph construction and observation building; the
remainder is Q-network action selection and replay-buffer writes. The random warm start
(``on_fit_start``) is timed separately and excluded from the rates.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from ppd.env.prompt_env import Timings
from ppd.fit import PPDCLI

TINY = (
    "--data.init_args.cache.sam_variant=tiny",
    "--data.init_args.cache.dino_name=tiny",
    "--data.init_args.cache.dino_resolution=112",
)


def _timed(fn: Callable[..., Any], acc: dict[str, float], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.perf_counter() - t0

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=48, help="training steps (= env steps = gradient steps)")
    p.add_argument("--tiny", action="store_true", help="random tiny encoders instead of the real weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (gpu: SAM decodes there too)")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 16-mixed, bf16-mixed")
    p.add_argument("overrides", nargs="*", help="extra ppd.fit options for the config (after --)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("PPD_RUNS", tempfile.mkdtemp(prefix="ppd_bench_runs_"))
    cli = PPDCLI(
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        seed_everything_default=0,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", a.config, *(TINY if a.tiny else ()), *a.overrides],
    )
    task, dm = cli.model, cli.datamodule
    t0 = time.perf_counter()
    dm.setup("fit")  # feature cache filled here (not timed in the rates)
    t_setup = time.perf_counter() - t0

    acc: dict[str, float] = defaultdict(float)
    task.act = _timed(task.act, acc, "act")
    task.td_step = _timed(task.td_step, acc, "td")
    task.training_step = _timed(task.training_step, acc, "step")
    on_fit_start = task.on_fit_start

    def warm_start() -> None:
        _timed(on_fit_start, acc, "warm_start")()
        dm.env.timings = Timings()  # measure the training loop only

    task.on_fit_start = warm_start
    trainer = L.Trainer(
        accelerator=a.accelerator,
        devices=1,
        precision=a.precision,
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=dm)

    loop = acc["step"]
    tm = dm.env.timings.seconds
    env_part = {k: tm[k] for k in ("decode", "dice", "graph", "observe")}
    enc = "tiny random encoders" if a.tiny else "MobileSAM + DINOv2-S/14 (cached features)"
    print(
        f"config {a.config} ({enc}); {len(dm.env)} training images, grid {dm.grid}, "
        f"{dm.envs_per_rank} parallel episodes, replay batch {dm.batch_size}, threads {a.threads}, "
        f"accelerator {a.accelerator}, precision {a.precision}, decoder {dm.decoder_backend}"
    )
    print(
        f"setup (feature cache + graphs) {t_setup:.1f} s, warm start {acc['warm_start']:.1f} s (not in rates)"
    )
    print(
        f"{trainer.global_step} training steps in {loop:.1f} s: "
        f"{task.transitions / loop:.2f} environment transitions/s ({task.env_steps} batched env steps, "
        f"{task.transitions} transitions), {sum(task.grad_steps.values()) / loop:.2f} gradient steps/s "
        f"(attack {task.grad_steps['attack']}, defend {task.grad_steps['defend']}), episodes {task.episode}"
    )
    n = max(trainer.global_step, 1)
    other_act = acc["act"] - sum(env_part.values())
    print("ms per training step:")
    print(f"  act total            {1000 * acc['act'] / n:8.1f}")
    for k, v in env_part.items():
        print(f"    env {k:<16} {1000 * v / n:8.1f}")
    print(f"    Q select + buffer  {1000 * other_act / n:8.1f}")
    print(f"  TD loss (fwd)        {1000 * acc['td'] / n:8.1f}")
    print(f"  backward + optimiser {1000 * (loop - acc['act'] - acc['td']) / n:8.1f}")
    print(f"  total                {1000 * loop / n:8.1f}")


if __name__ == "__main__":
    main()
