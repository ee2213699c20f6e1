"""Tests for ppd.env.graph: pooling, positions, dual-space k-NN graph, observation Data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppd.env.graph import (
    FEATURE_EDGE,
    PHYSICAL_EDGE,
    build_graph,
    node_positions,
    normalised_positions,
    physical_edges,
    pool_tokens,
    static_node_features,
    status_one_hot,
)


def _tokens(grid: int, channels: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(grid, grid, channels, generator=gen)


def _np_knn(dist: np.ndarray, k: int) -> dict[int, set[int]]:
    """Brute-force reference: k nearest of each row, self excluded, ties by smaller index."""
    dist = dist.astype(np.float64).copy()
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return {i: set(order[i].tolist()) for i in range(dist.shape[0])}


def _edges_by_centre(edge_index: torch.Tensor, n: int) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {i: set() for i in range(n)}
    for j, i in edge_index.t().tolist():
        out[i].add(j)
    return out


def _edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return {(j, i) for j, i in edge_index.t().tolist()}


def _np_feature_dist(tokens: torch.Tensor) -> np.ndarray:
    f = tokens.reshape(-1, tokens.shape[-1]).double().numpy()
    return np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))


def _np_grid_dist(grid: int) -> np.ndarray:
    idx = np.arange(grid * grid)
    cr = np.stack([idx % grid, idx // grid], 1).astype(np.float64)
    return np.sqrt(((cr[:, None] - cr[None]) ** 2).sum(-1))


# ------------------------------------------------------------------------------------------- pooling
def test_pool_tokens_identity_is_float32_copy() -> None:
    tok = _tokens(8).half()
    out = pool_tokens(tok, 8)
    assert out.dtype == torch.float32 and out.shape == (8, 8, 16)
    assert torch.equal(out, tok.float())


def test_pool_tokens_averages_blocks() -> None:
    tok = _tokens(8)
    out = pool_tokens(tok, 4)
    assert out.shape == (4, 4, 16)
    expected = tok.reshape(4, 2, 4, 2, 16).mean(dim=(1, 3))
    torch.testing.assert_close(out, expected)


def test_pool_tokens_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="tokens"):
        pool_tokens(torch.zeros(4, 16), 4)


# ----------------------------------------------------------------------------------------- positions
def test_node_positions_follow_convention() -> None:
    grid, H, W = 4, 100, 200
    pos = node_positions(grid, H, W)
    assert pos.shape == (16, 2) and pos.dtype == torch.float32
    for row in range(grid):
        for col in range(grid):
            i = row * grid + col
            assert pos[i].tolist() == pytest.approx([(col + 0.5) * W / grid, (row + 0.5) * H / grid])
    norm = normalised_positions(grid)
    assert norm.shape == (16, 2)
    torch.testing.assert_close(norm, pos / torch.tensor([W, H]))
    assert norm.min() > 0 and norm.max() < 1


# ------------------------------------------------------------------------------------------- k-NN graph
@pytest.mark.parametrize("grid,k", [(6, 5), (8, 8)])
def test_feature_knn_matches_brute_force(grid: int, k: int) -> None:
    tok = _tokens(grid, seed=grid)
    spec = build_graph(tok, k_feature=k, k_physical=3, symmetric=False)
    n = grid * grid
    ei, _ = spec.relation(FEATURE_EDGE)
    assert ei.shape == (2, n * k)
    # Direction: row 1 is the centre, each centre receives exactly k edges.
    assert torch.bincount(ei[1], minlength=n).tolist() == [k] * n
    assert _edges_by_centre(ei, n) == _np_knn(_np_feature_dist(tok), k)


@pytest.mark.parametrize("grid,k", [(5, 4), (7, 8), (6, 12)])
def test_physical_knn_matches_brute_force(grid: int, k: int) -> None:
    spec = build_graph(_tokens(grid), k_feature=2, k_physical=k, symmetric=False)
    n = grid * grid
    ei, _ = spec.relation(PHYSICAL_EDGE)
    assert ei.shape == (2, n * k)
    got = _edges_by_centre(ei, n)
    assert got == _np_knn(_np_grid_dist(grid), k)  # same tie-breaking (smaller index first)
    # Tie-independent check: interior node's 8 neighbours are its 8-neighbourhood when k = 8.
    if k == 8:
        centre = 3 * grid + 3
        ring = {(3 + dr) * grid + 3 + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)} - {centre}
        assert got[centre] == ring


def test_feature_ties_are_broken_by_smaller_index() -> None:
    # Integer-valued tokens with many exact duplicates: distances are exact, ties everywhere.
    gen = torch.Generator().manual_seed(11)
    tok = torch.randint(0, 3, (6, 6, 4), generator=gen).float()
    spec = build_graph(tok, k_feature=5, k_physical=2, symmetric=False)
    ei, _ = spec.relation(FEATURE_EDGE)
    assert _edges_by_centre(ei, 36) == _np_knn(_np_feature_dist(tok), 5)


def test_symmetric_graph_is_union_with_reverse_edges() -> None:
    grid, kf, kp = 6, 5, 8
    tok = _tokens(grid, seed=3)
    spec = build_graph(tok, k_feature=kf, k_physical=kp, symmetric=True)
    for etype, ref in (
        (FEATURE_EDGE, _np_knn(_np_feature_dist(tok), kf)),
        (PHYSICAL_EDGE, _np_knn(_np_grid_dist(grid), kp)),
    ):
        ei, attr = spec.relation(etype)
        expected = {(j, i) for i, js in ref.items() for j in js}
        expected |= {(i, j) for j, i in expected}
        assert _edge_set(ei) == expected
        assert ei.shape[1] == len(expected)  # no duplicate edges
        assert _edge_set(ei) == {(i, j) for j, i in _edge_set(ei)}  # symmetric
        assert attr.shape == (ei.shape[1], 1)


def test_edge_attributes_are_normalised_distances() -> None:
    grid = 6
    tok = _tokens(grid, seed=5)
    spec = build_graph(tok, k_feature=4, k_physical=4, symmetric=True)
    assert spec.edge_attr.dtype == torch.float32 and spec.edge_attr.shape == (spec.edge_index.shape[1], 1)
    assert spec.edge_attr.min() >= 0 and spec.edge_attr.max() <= 1
    for etype, dist in ((FEATURE_EDGE, _np_feature_dist(tok)), (PHYSICAL_EDGE, _np_grid_dist(grid))):
        ei, attr = spec.relation(etype)
        raw = dist[ei[0].numpy(), ei[1].numpy()]
        np.testing.assert_allclose(attr[:, 0].numpy(), raw / raw.max(), rtol=1e-5, atol=1e-6)
        assert attr.max().item() == pytest.approx(1.0)


def test_no_self_loops_types_and_dtypes() -> None:
    spec = build_graph(_tokens(8).half(), k_feature=8, k_physical=8, symmetric=True)
    assert spec.edge_index.dtype == torch.long and spec.edge_type.dtype == torch.long
    assert not (spec.edge_index[0] == spec.edge_index[1]).any()
    assert set(spec.edge_type.unique().tolist()) == {FEATURE_EDGE, PHYSICAL_EDGE}
    assert spec.edge_index.max() < 64 and spec.num_nodes == 64
    # Feature edges come first, then physical edges.
    assert torch.equal(spec.edge_type, spec.edge_type.sort(stable=True).values)
    # Each centre receives at least k edges per relation after symmetrisation.
    for etype in (FEATURE_EDGE, PHYSICAL_EDGE):
        ei, _ = spec.relation(etype)
        assert torch.bincount(ei[1], minlength=64).min() >= 8


def test_cosine_metric_uses_normalised_tokens() -> None:
    tok = _tokens(6, seed=9)
    # Rescaling each token changes L2 neighbours but not cosine neighbours.
    scale = torch.rand(6, 6, 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    a = build_graph(tok, k_feature=5, k_physical=2, symmetric=False, metric="cosine")
    b = build_graph(tok * scale, k_feature=5, k_physical=2, symmetric=False, metric="cosine")
    unit = torch.nn.functional.normalize(tok.reshape(36, -1), dim=1).reshape(6, 6, -1)
    ref = _np_knn(_np_feature_dist(unit), 5)
    assert _edges_by_centre(a.relation(FEATURE_EDGE)[0], 36) == ref
    assert _edges_by_centre(b.relation(FEATURE_EDGE)[0], 36) == ref
    with pytest.raises(ValueError, match="metric"):
        build_graph(tok, metric="manhattan")  # type: ignore[arg-type]


def test_build_graph_is_deterministic_and_validates_k() -> None:
    tok = _tokens(5, seed=2)
    a, b = build_graph(tok), build_graph(tok.clone())
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)
    with pytest.raises(ValueError, match="k_feature"):
        build_graph(tok, k_feature=25)
    with pytest.raises(ValueError, match="k_physical"):
        build_graph(tok, k_physical=0)
    with pytest.raises(ValueError, match="square"):
        build_graph(torch.zeros(4, 5, 8))


def test_constant_tokens_give_zero_feature_attributes() -> None:
    spec = build_graph(torch.ones(4, 4, 8), k_feature=3, k_physical=3)
    _, attr = spec.relation(FEATURE_EDGE)
    assert torch.equal(attr, torch.zeros_like(attr))


def test_physical_edges_are_memoised_but_returned_as_copies() -> None:
    ei, d = physical_edges(5, 4)
    ei[:] = 0
    ei2, _ = physical_edges(5, 4)
    assert not torch.equal(ei, ei2)
    # Pixel units on a non-square image prefer the closer axis.
    ei_px, _ = physical_edges(5, 2, symmetric=False, image_size=(10, 100))
    centre = 2 * 5 + 2
    nbrs = set(ei_px[0, ei_px[1] == centre].tolist())
    assert nbrs == {centre - 5, centre + 5}  # vertical neighbours are 2 px away, horizontal 20 px


# ----------------------------------------------------------------------------------------- observation
def test_env_observation_layout(tiny_sam: torch.nn.Module) -> None:
    """PromptEnv's node features are static_node_features + status_one_hot (the documented layout)."""
    from ppd.env.prompt_env import PromptEnv
    from ppd.types import CachedFeatures

    grid, c = 4, 16
    tok = _tokens(grid, c).half()
    feats = CachedFeatures(torch.zeros(256, 64, 64).half(), (64, 64), (64, 64), tok, "k")
    env = PromptEnv(
        tiny_sam, [feats, feats], [np.zeros((64, 64), bool)] * 2, grid=grid, k_feature=3, k_physical=3
    )
    status = torch.tensor([[0, 1, 2, 0] * 4, [2, 2, 0, 1] * 4])
    batch = env.observe(torch.tensor([0, 1]), status)
    pos = normalised_positions(grid)
    assert batch.x.shape == (32, c + 5) and batch.x.dtype == torch.float32
    torch.testing.assert_close(batch.x[:16, : c + 2], static_node_features(tok, pos))
    torch.testing.assert_close(batch.x[:16, :c].norm(dim=1), torch.ones(16))
    torch.testing.assert_close(batch.x[:, c + 2 :], status_one_hot(status).reshape(32, 3))
    assert batch.x[:, c + 2 :].argmax(1).tolist() == status.reshape(-1).tolist()
    spec = build_graph(tok.float(), k_feature=3, k_physical=3)
    assert batch.edge_index.max() == 31 and batch.edge_type.shape == (2 * spec.edge_type.numel(),)
    with pytest.raises(ValueError, match="status"):
        status_one_hot(torch.full((16,), 3))
    with pytest.raises(ValueError, match="positions_norm"):
        static_node_features(tok, pos[:15])
