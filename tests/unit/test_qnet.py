"""Tests of ppd.models.qnet: relation-aware Q-network and per-graph masked selection."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.nn import HeteroConv

from ppd.models.qnet import (
    QNetwork,
    batch_ptr,
    epsilon_greedy,
    gather_action_q,
    masked_argmax,
    masked_max,
    random_valid_action,
)

IN_DIM = 8 + 2 + 3


def make_graph(n: int, gen: torch.Generator, edges_per_rel: int = 3) -> Data:
    """Random graph with ``n`` nodes and both relations (random targets, distances in [0, 1])."""
    x = torch.randn(n, IN_DIM, generator=gen)
    src = torch.arange(n).repeat_interleave(edges_per_rel).repeat(2)
    dst = torch.randint(0, n, (2 * n * edges_per_rel,), generator=gen)
    edge_type = torch.cat([torch.zeros(n * edges_per_rel), torch.ones(n * edges_per_rel)]).long()
    edge_attr = torch.rand(2 * n * edges_per_rel, 1, generator=gen)
    return Data(x=x, edge_index=torch.stack([src, dst]), edge_attr=edge_attr, edge_type=edge_type)


def make_batch(sizes: list[int], seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch.from_data_list([make_graph(n, gen) for n in sizes])


def brute_force(q: torch.Tensor, mask: torch.Tensor, batch: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per-graph Python loop reference: first flat index attaining the max over valid entries."""
    actions, values = [], []
    for g in range(int(batch.max()) + 1):
        qg, mg = q[batch == g].flatten(), mask[batch == g].flatten()
        best_a, best_v = -1, float("-inf")
        for a in range(qg.numel()):
            if mg[a] and (best_a < 0 or qg[a].item() > best_v):
                best_a, best_v = a, qg[a].item()
        actions.append(best_a)
        values.append(best_v)
    return actions, values


def random_problem(seed: int, k: int, integer_q: bool = False):
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 7, (1,), generator=gen))
    sizes = torch.randint(1, 9, (b,), generator=gen)
    batch = torch.repeat_interleave(torch.arange(b), sizes)
    n = int(sizes.sum())
    q = torch.randint(-3, 4, (n, k), generator=gen).float() if integer_q else torch.randn(n, k, generator=gen)
    density = float(torch.rand(1, generator=gen))
    mask = torch.rand(n, k, generator=gen) < density
    if b > 1:  # force one graph with no valid action
        mask[batch == 0] = False
    return q, mask, batch, b


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("integer_q", [False, True])
def test_masked_argmax_matches_brute_force(k: int, integer_q: bool) -> None:
    for seed in range(150):
        q, mask, batch, b = random_problem(seed, k, integer_q)
        action, value = masked_argmax(q, mask, batch)
        ref_a, ref_v = brute_force(q, mask, batch)
        assert action.shape == (b,) and action.dtype == torch.long
        assert action.tolist() == ref_a, f"seed {seed}"
        assert value.tolist() == ref_v, f"seed {seed}"
        assert torch.equal(masked_max(q, mask, batch), value)
        # The chosen action is always valid.
        ptr = batch_ptr(batch)
        for g, a in enumerate(action.tolist()):
            if a >= 0:
                assert bool(mask[ptr[g] + a // k, a % k])
            else:
                assert not bool(mask[batch == g].any())


def test_no_valid_action_gives_minus_one_and_neg_inf() -> None:
    q = torch.randn(5, 2)
    mask = torch.zeros(5, 2, dtype=torch.bool)
    mask[3, 1] = True  # only graph 1 (nodes 2..4) has a valid action
    batch = torch.tensor([0, 0, 1, 1, 1])
    action, value = masked_argmax(q, mask, batch, num_graphs=3)  # graph 2 has no nodes at all
    assert action.tolist() == [-1, 3, -1]
    assert value[0] == float("-inf") and value[2] == float("-inf") and value[1] == q[3, 1]
    assert masked_max(q, mask, batch, num_graphs=3)[1] == q[3, 1]
    assert random_valid_action(mask, batch, torch.Generator().manual_seed(0), 3).tolist() == [-1, 3, -1]


def test_masked_argmax_rejects_bad_input() -> None:
    q = torch.randn(4, 2)
    with pytest.raises(ValueError, match="bool"):
        masked_argmax(q, torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        masked_argmax(q, torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="sorted"):
        masked_argmax(q, torch.ones(4, 2, dtype=torch.bool), torch.tensor([0, 1, 0, 1]))


def test_gather_action_q_round_trip_and_grad() -> None:
    q, mask, batch, b = random_problem(3, 2)
    q.requires_grad_(True)
    action, value = masked_argmax(q, mask, batch)
    ok = action >= 0
    ptr = batch_ptr(batch)
    picked = gather_action_q(q, batch, action.clamp_min(0), ptr)
    assert torch.equal(picked[ok].detach(), value[ok])
    assert torch.equal(gather_action_q(q, batch, action.clamp_min(0)), picked)  # ptr inferred
    picked[ok].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() == ok.sum()
    with pytest.raises(ValueError, match="out of range"):
        gather_action_q(q, batch, torch.full((b,), 10_000))


def test_random_valid_action_valid_and_roughly_uniform() -> None:
    # 4000 copies of one 5-node graph with K = 2 and 4 valid entries; each should get ~1000 draws.
    mask1 = torch.zeros(5, 2, dtype=torch.bool)
    valid_flat = [1, 4, 5, 8]
    mask1.view(-1)[valid_flat] = True
    copies = 4000
    mask = mask1.repeat(copies, 1)
    batch = torch.arange(copies).repeat_interleave(5)
    act = random_valid_action(mask, batch, torch.Generator().manual_seed(1))
    counts = torch.bincount(act, minlength=10)
    assert counts[valid_flat].sum() == copies  # never invalid
    assert ((counts[valid_flat] - 1000).abs() < 120).all(), counts.tolist()
    for seed in range(50):
        q, m, bt, _ = random_problem(seed, 2)
        a = random_valid_action(m, bt, torch.Generator().manual_seed(seed))
        ptr = batch_ptr(bt)
        for g, ag in enumerate(a.tolist()):
            assert (ag < 0) == (not bool(m[bt == g].any()))
            if ag >= 0:
                assert bool(m[ptr[g] + ag // 2, ag % 2])


def test_epsilon_greedy() -> None:
    q, mask, batch, b = random_problem(7, 2)
    greedy, _ = masked_argmax(q, mask, batch)
    assert torch.equal(epsilon_greedy(q, mask, batch, 0.0, torch.Generator().manual_seed(0)), greedy)
    # epsilon = 1 is the random policy with the same generator stream (random keys drawn first).
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(epsilon_greedy(q, mask, batch, 1.0, gen_a), random_valid_action(mask, batch, gen_b))
    # epsilon = 0.5 on many copies of a 2-node graph whose greedy action is 0 and random is 0 or 1.
    copies = 2000
    qq = torch.tensor([[1.0], [0.0]]).repeat(copies, 1)
    mm = torch.ones_like(qq, dtype=torch.bool)
    bb = torch.arange(copies).repeat_interleave(2)
    frac_one = epsilon_greedy(qq, mm, bb, 0.5, torch.Generator().manual_seed(2)).float().mean().item()
    assert abs(frac_one - 0.25) < 0.04
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_greedy(q, mask, batch, 1.5)


@pytest.mark.parametrize("conv", ["transformer", "gatv2"])
@pytest.mark.parametrize("out_per_node", [1, 2])
def test_qnetwork_shapes_and_batch_independence(conv: str, out_per_node: int) -> None:
    torch.manual_seed(0)
    net = QNetwork(IN_DIM, hidden=16, layers=2, heads=2, out_per_node=out_per_node, conv=conv).eval()
    sizes = [5, 9, 3]
    batch = make_batch(sizes)
    out = net(batch.x, batch.edge_index, batch.edge_attr, batch.edge_type)
    assert out.shape == (sum(sizes), out_per_node)
    assert torch.equal(net(batch), out)
    # Each graph's output does not depend on the other graphs in the batch.
    for g, data in enumerate(batch.to_data_list()):
        alone = net(data)
        assert torch.allclose(alone, out[batch.batch == g], atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_qnetwork_is_relation_aware() -> None:
    torch.manual_seed(0)
    net = QNetwork(IN_DIM, hidden=16, layers=2, heads=2, out_per_node=2).eval()
    batch = make_batch([6, 7], seed=1)
    base = net(batch)
    phys = batch.edge_type == 1
    changed = batch.clone()
    changed.edge_attr = batch.edge_attr.clone()
    changed.edge_attr[phys] = torch.rand(int(phys.sum()), 1, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(net(changed), base, atol=1e-4)
    # Relabelling relations (same edges, same attributes, types swapped) changes the output too.
    swapped = batch.clone()
    swapped.edge_type = 1 - batch.edge_type
    assert not torch.allclose(net(swapped), base, atol=1e-4)
    # Feature-edge attributes untouched by a physical-only change: check the converse does matter.
    changed_f = batch.clone()
    changed_f.edge_attr = batch.edge_attr.clone()
    changed_f.edge_attr[~phys] = 0.0
    assert not torch.allclose(net(changed_f), base, atol=1e-4)


def test_relation_split_equals_heteroconv_sum() -> None:
    """The per-relation split + sum is exactly HeteroConv(aggr='sum') on a single-node-type graph."""
    torch.manual_seed(0)
    net = QNetwork(IN_DIM, hidden=16, layers=1, heads=2).eval()
    batch = make_batch([6, 4], seed=2)
    h = net.input(batch.x)
    rels = [("n", "feature", "n"), ("n", "physical", "n")]
    hetero = HeteroConv({rel: net.convs[0][r] for r, rel in enumerate(rels)}, aggr="sum")
    ei = {rel: batch.edge_index[:, batch.edge_type == r] for r, rel in enumerate(rels)}
    ea = {rel: batch.edge_attr[batch.edge_type == r] for r, rel in enumerate(rels)}
    msg = hetero({"n": h}, ei, edge_attr_dict=ea)["n"]
    expected = net.head(torch.relu(net.norms[0](h + msg)))
    assert torch.allclose(net(batch), expected, atol=1e-6)


def test_qnetwork_handles_missing_relation_edges_and_rejects_bad_input() -> None:
    net = QNetwork(IN_DIM, hidden=8, layers=1, heads=2)
    batch = make_batch([4], seed=3)
    keep = batch.edge_type == 0  # no physical edges at all
    out = net(batch.x, batch.edge_index[:, keep], batch.edge_attr[keep], batch.edge_type[keep])
    assert out.shape == (4, 1) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="edge_type values"):
        net(batch.x, batch.edge_index, batch.edge_attr, batch.edge_type + 1)
    with pytest.raises(ValueError, match=r"x must have shape"):
        net(batch.x[:, :5], batch.edge_index, batch.edge_attr, batch.edge_type)
    with pytest.raises(ValueError, match="divisible"):
        QNetwork(IN_DIM, hidden=9, heads=2)
    with pytest.raises(ValueError, match="conv"):
        QNetwork(IN_DIM, conv="gcn")
