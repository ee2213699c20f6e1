"""SAMPO training throughput on CPU with cached embeddings (real MobileSAM + LoRA on the mask decoder).

Each configuration runs in a fresh subprocess: build the task, one warm-up step, then ``--steps`` timed
optimiser steps (forward policy + forward reference + backward + AdamW). Reports optimiser steps/s,
images/s and the peak resident-memory increase of the steps (``ru_maxrss`` after the timed steps minus the
resident memory before the first step), for SAMPO and for L_SUP-only (no reference pass), side by side.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/benchmarks/sampo_throughput.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _child(batch: int, n_sets: int, use_po: bool, steps: int, threads: int) -> dict[str, float]:
    import resource

    import torch

    from ppd.tasks.sampo import SAMPOTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = SAMPOTask(sam_variant="vit_t", n_prompt_sets=n_sets, use_po=use_po)
    task.configure_model()
    opt = task.configure_optimizers()
    gt = torch.zeros(batch, 1, 256, 256)
    gt[:, :, 60:160, 80:200] = 1.0
    valid = torch.zeros(batch, 1, 256, 256)
    valid[:, :, :192, :] = 1.0  # a 4:3 image
    b = {
        "embedding": torch.randn(batch, 256, 64, 64).half(),  # cached embeddings are fp16
        "gt_low": gt,
        "valid": valid,
        "input_size": torch.tensor([[768, 1024]] * batch),
        "index": torch.arange(batch),
    }

    def step() -> None:
        opt.zero_grad()
        task.sampo_losses(b)["loss"].backward()
        opt.step()
        task.train_steps += 1

    step()  # warm-up
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * 4096 / 2**20
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps_per_s": steps / dt, "images_per_s": steps * batch / dt, "peak_step_mb": peak - rss0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default="2x4,2x8,4x4", help="BATCHxN_SETS,...")
    p.add_argument("--child", nargs=3, metavar=("B", "N", "USE_PO"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        b, n, po = int(a.child[0]), int(a.child[1]), a.child[2] == "1"
        print(json.dumps(_child(b, n, po, a.steps, a.threads)))
        return 0
    print(
        f"SAMPO training throughput, MobileSAM decoder + LoRA r=16, CPU, {a.threads} thread(s), {a.steps} steps"
    )
    print(
        "| batch x N sets | SAMPO steps/s | L_SUP-only steps/s | SAMPO / SUP | SAMPO peak step MB | SUP peak step MB |"
    )
    print("|---|---|---|---|---|---|")
    for spec in a.configs.split(","):
        b, n = spec.split("x")
        res = {}
        for po in ("1", "0"):
            cmd = [
                sys.executable,
                __file__,
                "--steps",
                str(a.steps),
                "--threads",
                str(a.threads),
                "--child",
                b,
                n,
                po,
            ]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            res[po] = json.loads(out)
        s, u = res["1"], res["0"]
        print(
            f"| {b} x {n} | {s['steps_per_s']:.3f} | {u['steps_per_s']:.3f} | {s['steps_per_s'] / u['steps_per_s']:.2f} "
            f"| {s['peak_step_mb']:.0f} | {u['peak_step_mb']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
