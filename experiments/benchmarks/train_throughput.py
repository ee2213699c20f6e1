"""PPD training throughput: the dense learner vs the PyG reference learner, and how decode-bound training is.

    python experiments/benchmarks/train_throughput.py [--quick] [--threads 1] [--config configs/quickstart.yaml]
        [--accelerator gpu] [--precision 16-mixed] [-- --data.init_args.decoder_backend=torch ...]

Part 1, learner (no environment steps): on the quick-start config and on a G = 32 variant of it
(``data.grid=32``), at replay batch 32 and 128, one gradient step of each learner = sample the replay
buffer + TD loss (Double DQN, 3 Q-network forwards) + backward + clipping + Adam step, exactly as
``PPDTask.training_step`` runs it:

* reference: ``qnet_impl: pyg`` (``PromptEnv.observe`` -> PyG ``Batch`` -> PyG ``QNetwork``), both role
  buffers sampled per step, the zero-gradient DDP term added (the code before issue 10);
* new: ``qnet_impl: dense`` (:mod:`ppd.models.qnet_dense` on the env's static per-image tensors), only the
  active role's buffer sampled, no DDP term at world size 1; also with ``shared_online_forward``.

The two learners hold the same weights and alternate step by step (ratios measured side by side under
the same machine load). Buffers are filled with synthetic valid transitions (learner cost does not depend
on the values). Also printed: matmul GFLOP of one dense learner step (``torch.utils.flop_counter``) and
its achieved GFLOP/s next to a measured dense fp32 matmul rate, bytes per stored transition and an
estimated peak RSS of a paper-scale run.

Part 2, end to end: ``Trainer(max_steps=S)`` on the config with the new defaults (dense learner, no
decodes in the greedy attacker roll-out at each defence start) and with the reference path. Every prompt
set judged as a transition's next state is recorded; afterwards the same prompt sets are judged again
bare (``PromptEnv.dice_of``: SAM decode + Dice, same chunking) and the *decode-bound fraction* is
end-to-end transitions/s divided by that bare rate (1.0 = the loop costs nothing but its decodes).

The last two lines are parsed by scripts: ``learner speed-up vs reference (batch 128): N.NNx`` (quick-start
config) and ``decode-bound fraction: N.NN`` (new path).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from ppd.env.prompt_env import Timings
from ppd.env.roles import get_role
from ppd.fit import PPDCLI

TINY = (
    "--data.init_args.cache.sam_variant=tiny",
    "--data.init_args.cache.dino_name=tiny",
    "--data.init_args.cache.dino_resolution=112",
)
ROLES = ("attack", "defend")


def _cli(config: str, extra: list[str]) -> PPDCLI:
    return PPDCLI(
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        seed_everything_default=0,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", config, *extra],
    )


def fill_buffers(dm: Any, actor: Any, per_role: int, seed: int = 0) -> None:
    """Synthetic valid transitions in ``actor``'s buffers: ideal prompts + random extra activations, one
    random valid action."""
    actor.setup_buffers(dm.buffer_capacity, dm.num_nodes, dm.seed)
    g = torch.Generator().manual_seed(seed)
    n_img = len(dm.env)
    for role in ROLES:
        ids = torch.randint(0, n_img, (per_role,), generator=g)
        status = dm.ideal[ids].clone()
        extra = (torch.rand(status.shape, generator=g) < 0.05) & (status == 0)
        status[extra] = torch.randint(1, 3, (int(extra.sum()),), generator=g)
        mask = get_role(role).mask(status)
        mask[~mask.any(1)] = True  # (never happens with ideal prompts; keeps multinomial valid)
        action = torch.multinomial(mask.float(), 1, generator=g).squeeze(1)
        nxt = get_role(role).apply(status, action, torch.ones(per_role, dtype=torch.bool), check=False)
        actor.buffers[role].add_batch(
            ids,
            status,
            action,
            torch.randn(per_role, generator=g) * 0.05,
            nxt,
            torch.rand(per_role, generator=g) < 0.1,
        )


class Learner:
    """One role's gradient step of a PPDTask, as ``training_step`` runs it (without the env step)."""

    def __init__(self, task: Any, dm: Any, actor: Any, reference: bool) -> None:
        self.task, self.dm, self.actor, self.reference = task, dm, actor, reference
        task._trainer = SimpleNamespace(datamodule=dm, world_size=1)  # what td_step reads (env, device)
        self.opts = task.configure_optimizers()

    def step(self, role: str, batch: int) -> None:
        task = self.task
        if self.reference:
            samples = {r: self.actor.sample(r, batch) for r in ROLES}
            sample = samples[role]
        else:
            sample = self.actor.sample(role, batch)
        opt = self.opts[ROLES.index(role)]
        loss, _ = task.td_step(role, sample)
        if self.reference:
            other = task.q_def if role == "attack" else task.q_att
            loss = loss + 0.0 * sum(p.sum() for p in other.parameters())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.qnet(role).parameters(), task.hparams.grad_clip or 1e9)
        opt.step()


def time_side_by_side(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Seconds per call of each function, interleaved (after one untimed warm-up call each)."""
    for f in fns.values():
        f()
    acc: dict[str, float] = defaultdict(float)
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            acc[name] += time.perf_counter() - t0
    return {k: v / reps for k, v in acc.items()}


def matmul_gflops(hidden: int) -> float:
    """Measured fp32 dense matmul rate (GFLOP/s) at the learner's shapes: (8192, H) @ (H, 7H)."""
    a, b = torch.randn(8192, hidden), torch.randn(hidden, 7 * hidden)
    for _ in range(2):
        a @ b
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = (time.perf_counter() - t0) / reps
    return 2 * 8192 * hidden * 7 * hidden / dt / 1e9


def learner_part(a: argparse.Namespace, base: list[str]) -> dict[tuple[int, int], float]:
    """Prints the learner table; returns ``{(grid, batch): speed-up}``."""
    ratios: dict[tuple[int, int], float] = {}
    role_cycle = ("attack", "defend")
    for grid in a.grids:
        extra = [*base, f"--data.init_args.grid={grid}"]
        cli_new = _cli(a.config, [*extra, "--model.init_args.qnet_impl=dense"])
        cli_ref = _cli(a.config, [*extra, "--model.init_args.qnet_impl=pyg"])
        dm = cli_new.datamodule
        t0 = time.perf_counter()
        dm.setup("fit")
        graphs = dm.env.static_graphs()
        t_setup = time.perf_counter() - t0
        new, ref = cli_new.model, cli_ref.model
        fill_buffers(dm, new.actor, 2048)  # one set of buffers and one sampling RNG for all learners
        ref.load_state_dict(new.state_dict())
        shared = _cli(a.config, [*extra, "--model.init_args.shared_online_forward=true"]).model
        shared.load_state_dict(new.state_dict())
        learners = {
            "reference (pyg)": Learner(ref, dm, new.actor, reference=True),
            "new (dense)": Learner(new, dm, new.actor, reference=False),
            "new, shared s/s' forward": Learner(shared, dm, new.actor, reference=False),
        }
        h = new.hparams
        k = [int(t.shape[-1]) for t in graphs.nbr]
        print(
            f"\n[learner] grid {grid} (N = {grid * grid}), {len(dm.env)} images, hidden {h.hidden}, "
            f"layers {h.layers}, heads {h.heads}, {h.conv}; neighbour tables K = {k} (feature, physical), "
            f"mean degree {[round(float(v.sum(-1).float().mean()), 1) for v in graphs.valid]}; "
            f"static tensors {graphs.nbytes() / 2**20:.1f} MiB built in {t_setup:.1f} s (incl. features/graphs)"
        )
        for batch in a.batches:
            it = {name: iter(role_cycle * 1000) for name in learners}
            fns = {
                name: (lambda ln=ln, c=it[name], b=batch: ln.step(next(c), b))
                for name, ln in learners.items()
            }
            if a.quick and grid == 32:
                fns.pop("new, shared s/s' forward")
            sec = time_side_by_side(fns, a.reps)
            r = sec["reference (pyg)"] / sec["new (dense)"]
            ratios[(grid, batch)] = r
            row = ", ".join(f"{name} {1 / s:7.2f} steps/s ({1000 * s:7.1f} ms)" for name, s in sec.items())
            shared_s = sec.get("new, shared s/s' forward")
            r_shared = f"{sec['reference (pyg)'] / shared_s:.2f}x" if shared_s else "not run (--quick)"
            print(f"  batch {batch:4d}: {row}; speed-up {r:.2f}x (shared s/s' forward: {r_shared})")
            # FLOPs of one dense learner step (matmuls only; gathers/softmax are not counted)
            with FlopCounterMode(display=False) as fc:
                learners["new (dense)"].step("attack", batch)
            gf = fc.get_total_flops() / 1e9
            print(
                f"    dense learner step: {gf:.2f} GFLOP (matmul) -> {gf / sec['new (dense)']:.1f} GFLOP/s achieved; "
                f"measured dense fp32 matmul at H = {h.hidden}: {matmul_gflops(h.hidden):.1f} GFLOP/s "
                f"({torch.get_num_threads()} thread(s))"
            )
        n = grid * grid
        per = 2 * n + 8 + 8 + 4 + 1
        print(
            f"  replay: {per} bytes per stored transition (2 x {n} int8 status + image id, action, reward, done); "
            f"paper-scale buffers (2 roles x 100000): {2 * 100_000 * per / 2**20:.0f} MiB"
        )
        if grid == 16 or grid == a.grids[0]:  # the paper config uses grid 16
            f = dm.env.features[0]
            feat_mib = (
                f.sam_embedding.numel() * 2 + f.dino_tokens.numel() * 2 * 4
            ) / 2**20  # 448 px: 4x tokens
            static_mib = graphs.nbytes() / len(dm.env) / 2**20
        del cli_new, cli_ref, dm, learners
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    per = 2 * 256 + 21
    buf_mib = 2 * 100_000 * per / 2**20
    img_mib = 408 * (feat_mib + static_mib)
    print(
        f"\nmemory: peak RSS of this benchmark {rss:.0f} MiB (SAM, ONNX session, sample features, both "
        f"learners' activations up to G = 32, batch 128). Estimated peak RSS of configs/ppd_paper.yaml: this "
        f"+ buffers {buf_mib:.0f} MiB (2 x 100000 x {per} B) + 408 training images (CVC-ClinicDB train split) x ({feat_mib:.1f} MiB cached "
        f"features at dino_resolution 448 + {static_mib:.2f} MiB static graph tensors) = {img_mib:.0f} MiB "
        f"-> ~{rss + buf_mib + img_mib:.0f} MiB"
    )
    return ratios


def e2e(a: argparse.Namespace, base: list[str], impl: str) -> tuple[float, float, float, int]:
    """End-to-end training on the config; returns (transitions/s, bare judge rate, bare decode rate, n)."""
    extra = [*base, f"--model.init_args.qnet_impl={impl}"]
    if impl == "pyg":
        extra.append("--data.init_args.sample_roles=both")
    cli = _cli(a.config, extra)
    task, dm = cli.model, cli.datamodule
    dm.setup("fit")
    dm.env.static_graphs()
    acc: dict[str, float] = defaultdict(float)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    step_fn, finish = task.training_step, dm.env._finish

    def timed_step(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return step_fn(*args, **kw)
        finally:
            acc["loop"] += time.perf_counter() - t0

    start_defence = task.actor.start_defence

    def no_recording_defence_start(
        env: Any,
    ) -> None:  # the reference's greedy roll-out steps are not transitions
        acc["recording"], was = 0.0, acc.get("recording", 0.0)
        try:
            start_defence(env)
        finally:
            acc["recording"] = was

    task.actor.start_defence = no_recording_defence_start

    def recording_finish(new_status: torch.Tensor, sign: float, active: torch.Tensor) -> Any:
        if acc.get("recording"):
            idx = active.nonzero().squeeze(1)
            recorded.append((dm.env.image_ids[idx].clone(), new_status[idx].clone()))
        return finish(new_status, sign, active)

    task.training_step = timed_step
    dm.env._finish = recording_finish
    on_fit_start = task.on_fit_start

    def warm_start() -> None:
        on_fit_start()
        dm.env.timings = Timings()
        acc["recording"] = 1.0

    task.on_fit_start = warm_start
    trainer = L.Trainer(
        accelerator=a.accelerator,
        precision=a.precision,
        devices=1,
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=os.environ["PPD_RUNS"],  # episode panels go to the scratch folder, not the checkout
    )
    trainer.fit(task, datamodule=dm)
    n = sum(len(ids) for ids, _ in recorded)
    tm = dm.env.timings
    tm = Timings(seconds=dict(tm.seconds), calls=dict(tm.calls))  # before the bare re-judging below
    for key in ("decode", "dice", "observe"):
        tm.seconds.setdefault(key, 0.0)
        tm.calls.setdefault(key, 0)
    rate = task.transitions / acc["loop"]
    # the same prompt sets, judged bare (decode + Dice), and decoded bare (SAM only)
    env = dm.env
    t0 = time.perf_counter()
    for ids, st in recorded:
        env.dice_of(ids, st)
    t_judge = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids, st in recorded:
        env.low_res_logits(ids, st)
    t_dec = time.perf_counter() - t0
    steps = max(trainer.global_step, 1)
    print(
        f"\n[end to end, {impl}] {trainer.global_step} training steps, {task.transitions} transitions "
        f"(+ {tm.calls['decode'] - n} other decodes: start states, reference greedy roll-outs) in {acc['loop']:.1f} s: {rate:.2f} transitions/s, "
        f"{sum(task.grad_steps.values()) / acc['loop']:.2f} gradient steps/s, episodes {task.episode}"
    )
    print(
        f"  ms per training step: total {1000 * acc['loop'] / steps:.1f}, of which env decode "
        f"{1000 * tm.seconds['decode'] / steps:.1f}, Dice {1000 * tm.seconds['dice'] / steps:.1f}, "
        f"observe {1000 * tm.seconds['observe'] / steps:.1f}"
    )
    print(
        f"  bare judge of the same {n} prompt sets: {n / t_judge:.2f} sets/s (decode + Dice), "
        f"{n / t_dec:.2f} sets/s (decode only)"
    )
    assert n == task.transitions, (n, task.transitions)
    return rate, n / t_judge, n / t_dec, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (whole run < 5 min)")
    p.add_argument("--reps", type=int, default=None, help="timed learner steps per setting")
    p.add_argument("--steps", type=int, default=None, help="end-to-end training steps")
    p.add_argument("--tiny", action="store_true", help="random tiny encoders instead of the real weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-reference-e2e", action="store_true")
    p.add_argument("--skip-learner", action="store_true", help="end-to-end part only")
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="node grids of the learner part")
    p.add_argument(
        "--batches", type=int, nargs="+", default=[32, 128], help="replay batches of the learner part"
    )
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the end-to-end part")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 16-mixed, bf16-mixed")
    a, extra = (
        p.parse_known_args()
    )  # after "--": config overrides, e.g. --data.init_args.decoder_backend=torch
    extra = [x for x in extra if x != "--"]
    a.reps = a.reps or (1 if a.quick else 4)
    a.steps = a.steps or (24 if a.quick else 96)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("PPD_RUNS", tempfile.mkdtemp(prefix="ppd_bench_runs_"))
    base = (list(TINY) if a.tiny else []) + extra
    enc = "tiny random encoders" if a.tiny else "MobileSAM + DINOv2-S/14 (cached features)"
    print(f"config {a.config} ({enc}), {a.threads} thread(s), torch {torch.__version__}")
    ratios = {} if a.skip_learner else learner_part(a, base)
    rate, judge, dec, _ = e2e(a, base, "dense")
    if not a.skip_reference_e2e:
        rate_ref, judge_ref, _, _ = e2e(a, base, "pyg")
        print(
            f"\nend to end: new {rate:.2f} vs reference {rate_ref:.2f} transitions/s ({rate / rate_ref:.2f}x); "
            f"reference decode-bound fraction {rate_ref / judge_ref:.2f}"
        )
    print(f"decode-bound fraction vs decode only (no Dice): {rate / dec:.2f}")
    for (grid, batch), r in ratios.items():
        print(f"learner speed-up vs reference (grid {grid}, batch {batch}): {r:.2f}x")
    if ratios:
        key = (a.grids[0], 128) if (a.grids[0], 128) in ratios else max(ratios)
        print(f"learner speed-up vs reference (batch {key[1]}): {ratios[key]:.2f}x")
    print(f"decode-bound fraction: {rate / judge:.2f}")


if __name__ == "__main__":
    main()
