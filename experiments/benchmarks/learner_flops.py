"""Matmul GFLOP of one dense learner update (Double-DQN TD loss: 3 forwards + backward) at given sizes.

    python experiments/benchmarks/learner_flops.py [--grid 16] [--hidden 128] [--layers 3] [--batch 128]

Defaults are ``configs/ppd_paper.yaml``'s network and replay batch. Graphs are kNN graphs of smooth random
token fields (their degree statistics resemble real DINOv2 ones: feature in-degree ~10 after symmetrising).
Counts ``torch.utils.flop_counter`` FLOPs (matmuls; gathers, softmax and element-wise work are not counted).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ppd.env.graph import build_graph
from ppd.models.qnet_dense import DenseQNetwork, dense_graphs
from ppd.rl.dense_learner import dense_td_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--channels", type=int, default=384)
    a = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, c = a.grid * a.grid, a.channels
    base = torch.randn(1, c, 4, 4, generator=g)
    specs = []
    for _ in range(a.images):
        tok = F.interpolate(base, size=(a.grid, a.grid), mode="bilinear")[0].permute(1, 2, 0)
        specs.append(build_graph(tok + 0.3 * torch.randn(a.grid, a.grid, c, generator=g)))
    graphs = dense_graphs(
        torch.randn(a.images, n, c + 2, generator=g),
        [s.edge_index for s in specs],
        [s.edge_attr for s in specs],
        [s.edge_type for s in specs],
    )
    kw = dict(hidden=a.hidden, layers=a.layers, heads=2, out_per_node=2)
    net, tgt = DenseQNetwork(c + 5, **kw), DenseQNetwork(c + 5, **kw)
    status = torch.randint(0, 3, (a.batch, n), generator=g).to(torch.int8)
    status[:, 0] = 0
    sample = {
        "image_id": torch.randint(0, a.images, (a.batch,), generator=g),
        "status": status,
        "next_status": status,
        "action": torch.zeros(a.batch, dtype=torch.long),
        "reward": torch.zeros(a.batch),
        "done": torch.zeros(a.batch, dtype=torch.bool),
    }
    with FlopCounterMode(display=False) as fc:
        loss, _ = dense_td_loss(net, tgt, graphs, sample, "attack", 0.95)
        loss.backward()
    print(
        f"grid {a.grid}, hidden {a.hidden}, layers {a.layers}, batch {a.batch}: "
        f"{fc.get_total_flops() / 1e9:.1f} GFLOP (matmul) per dense learner update"
    )


if __name__ == "__main__":
    main()
