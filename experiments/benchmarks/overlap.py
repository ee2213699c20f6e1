"""Does decoding in a second thread / process while the learner updates raise transitions/s (issue 10, item 5)?

    python experiments/benchmarks/overlap.py [--images examples/data/ph2] [--steps 24] [--envs 1 4]
        [--backend onnx_cached] [--rounds 2]

One training step = act (online Q-network forward, epsilon-greedy attacker actions) on E parallel episodes
-> SAM decode + low-res Dice of the E next states (the reward) -> one learner update (Double-DQN TD loss
on a replay batch of 32, backward, Adam) on the dense learner (:class:`~ppd.models.qnet_dense.DenseQNetwork`,
hidden 64, 2 layers, G = 16), the real MobileSAM decoder on the cached features of ``--images``.
Modes, measured side by side (interleaved in ``--rounds`` rounds, best round kept):

* ``sequential 1 thread`` -- decode, then update, torch and ONNX Runtime on 1 thread;
* ``sequential 2 threads`` -- the same with 2 intra-op threads (both cores on one thing at a time);
* ``overlap thread`` -- the next states' decode runs in a worker thread (1 thread) while the main thread
  (1 torch thread) updates; the update uses the replay buffer without the step's own transitions
  (one step stale), which is the only change to the algorithm;
* ``overlap process`` -- the same with the decoder in a ``torch.multiprocessing`` worker process (its own
  SAM + environment; requests and Dice values go through queues).

Prints transitions/s and gradient steps/s per mode and E, and each mode's speed-up vs sequential 1 thread.
"""

from __future__ import annotations

import argparse
import copy
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.prompt_env import PromptEnv
from ppd.env.prompts import ideal_prompts
from ppd.env.roles import ATTACK
from ppd.models.qnet_dense import DenseQNetwork
from ppd.models.sam import build_sam
from ppd.rl.agent import DQNAgent
from ppd.rl.dense_learner import dense_td_loss
from ppd.rl.replay import ReplayBuffer

G = 16
MODES = ("sequential 1 thread", "sequential 2 threads", "overlap thread", "overlap process")


def _process_worker(req: Any, res: Any, feats: list, masks: list, backend: str) -> None:
    """Decoder process: builds its own SAM + env, answers ``(ids, status)`` with Dice until ``None``."""
    torch.set_num_threads(1)
    env = PromptEnv(build_sam("vit_t"), feats, masks, grid=G, decoder_backend=backend)
    res.put("ready")
    while (item := req.get()) is not None:
        ids, status = item
        res.put(env.dice_of(ids, status))


class Judge:
    """Dice of prompt states: synchronous, in a worker thread, or in a worker process.

    Args:
        mode: ``sync``, ``thread`` or ``process``.
        env: the environment used by ``sync``/``thread``.
        feats, masks, backend: what the ``process`` worker builds its own environment from.
    """

    def __init__(self, mode: str, env: PromptEnv, feats: list, masks: list, backend: str) -> None:
        self.mode, self.env = mode, env
        if mode == "thread":
            self._in: queue.Queue = queue.Queue()
            self._out: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()
        elif mode == "process":
            ctx = mp.get_context("spawn")
            self._in, self._out = ctx.Queue(), ctx.Queue()
            self._proc = ctx.Process(
                target=_process_worker, args=(self._in, self._out, feats, masks, backend)
            )
            self._proc.start()
            if self._out.get(timeout=600) != "ready":
                raise RuntimeError("decoder process did not start")

    def _serve(self) -> None:
        while (item := self._in.get()) is not None:
            self._out.put(self.env.dice_of(*item))

    def submit(self, ids: torch.Tensor, status: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start judging; returns a function that waits for the ``(B,)`` Dice."""
        if self.mode == "sync":
            d = self.env.dice_of(ids, status)
            return lambda: d
        self._in.put((ids.clone(), status.clone()))
        return self._out.get

    def close(self) -> None:
        if self.mode == "thread":
            self._in.put(None)
            self._thread.join()
        elif self.mode == "process":
            self._in.put(None)
            self._proc.join(timeout=60)


def run_mode(
    mode: str,
    e: int,
    steps: int,
    sam: Any,
    feats: list,
    masks: list,
    ideal: torch.Tensor,
    net: DenseQNetwork,
    backend: str,
    seed: int,
) -> tuple[float, float]:
    """``steps`` training steps with E parallel episodes in one mode; returns (transitions/s, steps/s)."""
    threads = 2 if mode == "sequential 2 threads" else 1
    torch.set_num_threads(threads)
    env = PromptEnv(sam, feats, masks, grid=G, decoder_backend=backend)  # ORT threads = torch threads now
    graphs = env.static_graphs()
    judge = Judge(
        {"overlap thread": "thread", "overlap process": "process"}.get(mode, "sync"),
        env,
        feats,
        masks,
        backend,
    )
    online = copy.deepcopy(net)
    target = copy.deepcopy(net)
    opt = torch.optim.Adam(online.parameters(), lr=1e-4)
    agent = DQNAgent("attack", online, target)
    g = torch.Generator().manual_seed(seed)
    buf = ReplayBuffer(10_000, G * G)
    # warm buffer: synthetic valid transitions (the learner's cost does not depend on the values)
    n_warm = 256
    wid = torch.randint(0, len(env), (n_warm,), generator=g)
    ws = ideal[wid].clone()
    free = (ws == 0).nonzero()
    pick = free[torch.randperm(len(free), generator=g)[:n_warm]]
    act = torch.zeros(n_warm, dtype=torch.long)
    nxt = ws.clone()
    nxt[pick[:, 0], pick[:, 1]] = 1
    act[pick[:, 0]] = 2 * pick[:, 1]
    buf.add_batch(wid, ws, act, torch.zeros(n_warm), nxt, torch.zeros(n_warm, dtype=torch.bool))

    ids = torch.arange(e) % len(env)
    status = ideal[ids].clone()
    dice = env.dice_of(ids, status)
    if judge.mode == "process":  # the worker's first decode of each image builds its per-image state
        judge.submit(ids, status)()
    budget, t_in_ep = 12, 0

    def update() -> None:
        sample = buf.sample(32, g)
        loss, _ = dense_td_loss(online, target, graphs, sample, "attack", 0.95)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(steps):
        actions, _ = agent.select(graphs, ids, status, 0.5, g)
        live = actions >= 0
        new = ATTACK.apply(status, actions.clamp_min(0), live, check=False)
        wait = judge.submit(ids, new)
        if judge.mode == "sync":
            d2 = wait()
            buf.add_batch(
                ids, status, actions.clamp_min(0), -(d2 - dice), new, torch.zeros(e, dtype=torch.bool)
            )
            update()
        else:
            update()  # overlaps the decode; the buffer misses this step's transitions (one step stale)
            d2 = wait()
            buf.add_batch(
                ids, status, actions.clamp_min(0), -(d2 - dice), new, torch.zeros(e, dtype=torch.bool)
            )
        status, dice, t_in_ep = new, d2, t_in_ep + 1
        if t_in_ep == budget:  # next episode: the next images, from their ideal prompts
            ids = (ids + e) % len(env)
            status = ideal[ids].clone()
            dice = env.dice_of(ids, status) if judge.mode != "process" else judge.submit(ids, status)()
            t_in_ep = 0
    dt = time.perf_counter() - t0
    judge.close()
    torch.set_num_threads(1)
    return steps * e / dt, steps / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="examples/data/ph2")
    p.add_argument("--steps", type=int, default=24, help="training steps per mode and round")
    p.add_argument("--envs", type=int, nargs="+", default=[1, 4], help="parallel episodes E (envs_per_rank)")
    p.add_argument("--backend", default="onnx_cached", help="PromptEnv decoder_backend")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    samples = list(SegmentationFolder(a.images))
    cache = FeatureCache()
    feats = [cache.get(s.image) for s in samples]
    masks = [s.mask for s in samples]
    sam = build_sam("vit_t")
    ideal = torch.stack(
        [
            ideal_prompts(m, G, 1, 10, 10, generator=torch.Generator().manual_seed(i)).long()
            for i, m in enumerate(masks)
        ]
    )
    c = feats[0].dino_tokens.shape[-1]
    torch.manual_seed(0)
    net = DenseQNetwork(c + 5, hidden=64, layers=2, heads=2, out_per_node=2)
    print(
        f"{len(samples)} images, MobileSAM decoder [{a.backend}], DenseQNetwork hidden 64 x 2 layers, G = {G}, "
        f"replay batch 32; {a.steps} steps per mode, best of {a.rounds} rounds"
    )
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in range(a.rounds):
        for e in a.envs:
            for mode in MODES:
                tps, sps = run_mode(mode, e, a.steps, sam, feats, masks, ideal, net, a.backend, seed=r)
                if best.get((mode, e), (0.0, 0.0))[0] < tps:
                    best[(mode, e)] = (tps, sps)
    for e in a.envs:
        base = best[(MODES[0], e)][0]
        print(f"E = {e} parallel episodes (one update per {e} transition(s)):")
        for mode in MODES:
            tps, sps = best[(mode, e)]
            print(
                f"  {mode:22s} {tps:6.2f} transitions/s  {sps:6.2f} updates/s  {tps / base:5.2f}x sequential 1 thread"
            )
    gains = [best[(m, e)][0] / best[(MODES[1], e)][0] for e in a.envs for m in MODES[2:]]
    print(f"best overlap vs sequential 2 threads: {np.max(gains):.2f}x")


if __name__ == "__main__":
    main()
