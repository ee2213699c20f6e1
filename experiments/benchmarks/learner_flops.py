"""Matmul GFLOP of one dense learner update (Double-DQN TD loss: 3 forwards + backward) at given sizes,
its measured time, the achieved GFLOP/s, and the machine's dense fp32 matmul rate next to it.

    python experiments/benchmarks/learner_flops.py [--grid 16] [--hidden 128] [--layers 3] [--batch 128]
        [--threads 1] [--repeats 5]

Defaults are ``configs/ppd_paper.yaml``'s network and replay batch. Graphs are kNN graphs of smooth random
token fields (their degree statistics resemble real DINOv2 ones: feature in-degree ~10 after symmetrising).
Counts ``torch.utils.flop_counter`` FLOPs (matmuls; gathers, softmax and element-wise work are not counted).
The update timed is TD loss + backward + Adam step (median of ``--repeats`` after one warm-up); the matmul
rate is the median of square fp32 matmuls (1024^3) and of a learner-shaped one ``(B N, H) @ (H, H)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ppd.env.graph import build_graph
from ppd.models.qnet_dense import DenseGraphs, DenseQNetwork, dense_graphs
from ppd.rl.dense_learner import dense_td_loss


def synthetic_graphs(grid: int, images: int, channels: int, seed: int = 0) -> DenseGraphs:
    """:class:`DenseGraphs` of ``images`` kNN graphs over smooth random ``(grid, grid, channels)`` token fields."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    base = torch.randn(1, channels, 4, 4, generator=g)
    specs = []
    for _ in range(images):
        tok = F.interpolate(base, size=(grid, grid), mode="bilinear")[0].permute(1, 2, 0)
        specs.append(build_graph(tok + 0.3 * torch.randn(grid, grid, channels, generator=g)))
    return dense_graphs(
        torch.randn(images, n, channels + 2, generator=g),
        [s.edge_index for s in specs],
        [s.edge_attr for s in specs],
        [s.edge_type for s in specs],
    )


def make_update(
    graphs: DenseGraphs, hidden: int, layers: int, batch: int, seed: int = 0
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A dense learner (online + target :class:`DenseQNetwork`, Adam) on random valid replay samples.

    Returns:
        ``(update, loss_backward)``: one full update (TD loss + backward + Adam step) and the TD loss +
        backward alone (what the FLOP counter sees).
    """
    g = torch.Generator().manual_seed(seed)
    n, c = graphs.num_nodes, graphs.x_static.shape[-1] - 2
    kw = dict(hidden=hidden, layers=layers, heads=2, out_per_node=2)
    net, tgt = DenseQNetwork(c + 5, **kw), DenseQNetwork(c + 5, **kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    status = torch.randint(0, 3, (batch, n), generator=g).to(torch.int8)
    status[:, 0] = 0
    sample = {
        "image_id": torch.randint(0, graphs.num_images, (batch,), generator=g),
        "status": status,
        "next_status": status,
        "action": torch.zeros(batch, dtype=torch.long),
        "reward": torch.zeros(batch),
        "done": torch.zeros(batch, dtype=torch.bool),
    }

    def loss_backward() -> None:
        loss, _ = dense_td_loss(net, tgt, graphs, sample, "attack", 0.95)
        loss.backward()

    def update() -> None:
        opt.zero_grad()
        loss_backward()
        opt.step()

    return update, loss_backward


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Measured fp32 GFLOP/s of ``(m, k) @ (k, n)``."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / median_seconds(lambda: a @ b, repeats) / 1e9


def update_gflop(loss_backward: Callable[[], None]) -> float:
    """Matmul GFLOP of one TD loss + backward (``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as fc:
        loss_backward()
    return fc.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    graphs = synthetic_graphs(a.grid, a.images, a.channels)
    update, loss_backward = make_update(graphs, a.hidden, a.layers, a.batch)
    gflop = update_gflop(loss_backward)
    print(
        f"grid {a.grid}, hidden {a.hidden}, layers {a.layers}, batch {a.batch}: "
        f"{gflop:.1f} GFLOP (matmul) per dense learner update"
    )
    t = median_seconds(update, a.repeats)
    n = a.grid * a.grid
    square = matmul_gflops(1024, 1024, 1024, a.repeats)
    shaped = matmul_gflops(min(a.batch * n, 32768), a.hidden, a.hidden, a.repeats)
    print(
        f"update (TD loss + backward + Adam): {1000 * t:.0f} ms -> achieved {gflop / t:.1f} GFLOP/s; "
        f"dense fp32 matmul on {a.threads} thread(s): {square:.0f} GFLOP/s (1024^3), "
        f"{shaped:.0f} GFLOP/s ({min(a.batch * n, 32768)}x{a.hidden})@({a.hidden}x{a.hidden}); "
        f"learner at {100 * gflop / t / square:.0f}% of the 1024^3 rate"
    )


if __name__ == "__main__":
    main()
