"""Tests for ppd.env.prompts: prompt initialisers on the node grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppd.env.graph import node_positions
from ppd.env.prompts import (
    NEGATIVE,
    POSITIVE,
    click_prompts,
    feature_matching_prompts,
    ideal_prompts,
    mask_fraction_on_grid,
    mask_on_grid,
    persam_prompts,
    random_prompts,
    status_to_points,
)


def _disc_mask(H: int, W: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _mask_from_nodes(nodes: list[int], grid: int, cell: int = 4) -> torch.Tensor:
    """(grid * cell, grid * cell) mask that covers exactly the patches of ``nodes``."""
    m = torch.zeros(grid * grid, dtype=torch.bool)
    m[nodes] = True
    return m.reshape(grid, grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def _basis_tokens(grid: int, scale: float = 10.0) -> torch.Tensor:
    """Tokens = scaled one-hot vectors: pairwise distance scale * sqrt(2), all distinct."""
    n = grid * grid
    return (torch.eye(n) * scale).reshape(grid, grid, n)


def _centre_pixel(node: int, grid: int, H: int, W: int) -> tuple[int, int]:
    x, y = node_positions(grid, H, W)[node].tolist()
    return int(np.floor(y)), int(np.floor(x))


# ----------------------------------------------------------------------------------------------- masks
def test_mask_on_grid_samples_node_centres() -> None:
    H, W, grid = 37, 50, 8
    mask = _disc_mask(H, W, 20, 15, 11)
    on_grid = mask_on_grid(mask, grid)
    assert on_grid.shape == (grid, grid) and on_grid.dtype == torch.bool
    for node in range(grid * grid):
        r, c = _centre_pixel(node, grid, H, W)
        assert bool(on_grid.reshape(-1)[node]) == bool(mask[r, c])
    assert torch.equal(mask_on_grid(torch.from_numpy(mask), grid), on_grid)
    with pytest.raises(ValueError, match="mask"):
        mask_on_grid(np.zeros((3, 4, 1), bool), grid)


def test_mask_fraction_on_grid() -> None:
    mask = _mask_from_nodes([0, 5], grid=4)
    frac = mask_fraction_on_grid(mask, 4)
    assert frac.reshape(-1).tolist() == [1.0 if i in (0, 5) else 0.0 for i in range(16)]


# ----------------------------------------------------------------------------------------------- ideal
@pytest.mark.parametrize("interval", [1, 2, 3])
def test_ideal_prompts_agree_with_mask_uncapped(interval: int) -> None:
    H, W, grid = 60, 80, 10
    mask = _disc_mask(H, W, 40, 30, 18)
    status = ideal_prompts(mask, grid, interval=interval, max_pos=None, max_neg=None)
    assert status.shape == (grid * grid,) and status.dtype == torch.long
    lines = set(range(0, grid, interval))
    for node in range(grid * grid):
        row, col = divmod(node, grid)
        r, c = _centre_pixel(node, grid, H, W)
        if row in lines and col in lines:
            assert status[node].item() == (POSITIVE if mask[r, c] else NEGATIVE)
        else:
            assert status[node].item() == 0
    assert int((status > 0).sum()) == len(lines) ** 2


def test_ideal_prompts_caps_and_determinism() -> None:
    H, W, grid = 64, 64, 16
    mask = _disc_mask(H, W, 32, 32, 20)
    full = ideal_prompts(mask, grid, max_pos=None, max_neg=None)
    assert int((full == POSITIVE).sum()) > 10 and int((full == NEGATIVE).sum()) > 10

    capped = ideal_prompts(mask, grid, max_pos=10, max_neg=7, generator=torch.Generator().manual_seed(0))
    assert int((capped == POSITIVE).sum()) == 10 and int((capped == NEGATIVE).sum()) == 7
    # Subsample of the uncapped labelling: same label wherever active.
    active = capped > 0
    assert torch.equal(capped[active], full[active])

    again = ideal_prompts(mask, grid, max_pos=10, max_neg=7, generator=torch.Generator().manual_seed(0))
    other = ideal_prompts(mask, grid, max_pos=10, max_neg=7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(capped, again)
    assert not torch.equal(capped, other)

    # Cap larger than the count keeps everything; cap 0 removes the class.
    assert torch.equal(ideal_prompts(mask, grid, max_pos=10_000, max_neg=10_000), full)
    none_neg = ideal_prompts(mask, grid, max_pos=None, max_neg=0)
    assert int((none_neg == NEGATIVE).sum()) == 0 and torch.equal(none_neg == POSITIVE, full == POSITIVE)


def test_ideal_prompts_validates_arguments() -> None:
    mask = np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match="interval"):
        ideal_prompts(mask, 4, interval=0)
    with pytest.raises(ValueError, match="max_pos"):
        ideal_prompts(mask, 4, max_pos=-1)
    with pytest.raises(ValueError, match="offset"):
        ideal_prompts(mask, 4, interval=2, offset=2)


# ------------------------------------------------------------------------------------ feature matching
def test_feature_matching_on_permuted_tokens() -> None:
    grid = 4
    n = grid * grid
    ref = _basis_tokens(grid)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    tgt = ref.reshape(n, -1)[perm].reshape(grid, grid, -1)  # tgt node t holds reference patch perm[t]
    fg_nodes = [1, 2, 5, 6]
    status, info = feature_matching_prompts(
        ref, _mask_from_nodes(fg_nodes, grid), tgt, max_pos=None, max_neg=None
    )
    expected = torch.full((n,), NEGATIVE)
    expected[torch.isin(perm, torch.tensor(fg_nodes))] = POSITIVE
    assert torch.equal(status, expected)
    assert info["n_pos"] == 4 and info["n_neg"] == 12 and info["n_conflicts"] == 0
    assert info["no_positive"] is False and info["n_ref_fg"] == 4 and info["n_ref_bg"] == 12

    # Bidirectional: all matches are mutual, nothing changes.
    status_bi, info_bi = feature_matching_prompts(
        ref, _mask_from_nodes(fg_nodes, grid), tgt, bidirectional=True, max_pos=None, max_neg=None
    )
    assert torch.equal(status_bi, expected) and info_bi["n_cycle_rejected"] == 0

    # Cosine metric gives the same answer on these tokens.
    status_cos, _ = feature_matching_prompts(
        ref, _mask_from_nodes(fg_nodes, grid), tgt, metric="cosine", max_pos=None, max_neg=None
    )
    assert torch.equal(status_cos, expected)


def _conflict_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference patch 1 (fg) and 2 (bg) both match target patch 1; target patch 2 is unreachable."""
    grid = 3
    ref = _basis_tokens(grid)
    tgt = ref.clone().reshape(9, -1)
    tgt[1] = (ref.reshape(9, -1)[1] + ref.reshape(9, -1)[2]) / 2  # midpoint of a fg and a bg token
    tgt[2] = -100.0  # far from everything
    return ref, _mask_from_nodes([1], grid), tgt.reshape(grid, grid, -1)


def test_feature_matching_counts_conflicts_and_no_positive() -> None:
    ref, mask, tgt = _conflict_example()
    status, info = feature_matching_prompts(ref, mask, tgt, max_pos=None, max_neg=None)
    assert info["n_conflicts"] == 1
    assert info["no_positive"] is True and info["n_pos"] == 0
    assert status[1] == 0 and status[2] == 0  # conflict dropped, unmatched patch inactive
    assert info["n_neg"] == 7 and int((status == NEGATIVE).sum()) == 7

    # Cycle check: target patch 1's nearest reference patch is patch 1 (fg; tie -> smaller index), so the
    # bg match 2 -> 1 is rejected and no conflict remains.
    status_bi, info_bi = feature_matching_prompts(
        ref, mask, tgt, bidirectional=True, max_pos=None, max_neg=None
    )
    assert info_bi["n_conflicts"] == 0 and info_bi["n_cycle_rejected"] == 1
    assert status_bi[1] == POSITIVE and info_bi["no_positive"] is False


def test_feature_matching_empty_reference_mask_has_no_positive() -> None:
    ref = _basis_tokens(3)
    status, info = feature_matching_prompts(ref, torch.zeros(12, 12, dtype=torch.bool), ref)
    assert info["no_positive"] is True and info["n_ref_fg"] == 0 and not info["ref_fg_fallback"]
    assert int((status == POSITIVE).sum()) == 0


def test_feature_matching_small_object_falls_back_to_coverage() -> None:
    ref = _basis_tokens(3)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[4, 4] = True  # one pixel in patch (1, 1), not its centre pixel (6, 6)
    status, info = feature_matching_prompts(ref, mask, ref, max_pos=None, max_neg=None)
    assert info["ref_fg_fallback"] is True and info["n_ref_fg"] == 1
    assert status[4] == POSITIVE and int((status == POSITIVE).sum()) == 1


def test_feature_matching_caps_keep_best_matches() -> None:
    grid = 4
    n = grid * grid
    ref = _basis_tokens(grid)
    noise_dir = torch.zeros(n)
    noise_dir[0] = 1.0
    eps = torch.linspace(0.01, 0.3, n)[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    tgt = (ref.reshape(n, -1) + eps[:, None] * noise_dir).reshape(grid, grid, -1)
    fg_nodes = list(range(8))
    mask = _mask_from_nodes(fg_nodes, grid)
    status, info = feature_matching_prompts(ref, mask, tgt, max_pos=3, max_neg=2)
    fg = torch.tensor(fg_nodes)
    bg = torch.arange(8, 16)
    best_fg = set(fg[eps[fg].argsort()[:3]].tolist())
    best_bg = set(bg[eps[bg].argsort()[:2]].tolist())
    assert set(torch.nonzero(status == POSITIVE).reshape(-1).tolist()) == best_fg
    assert set(torch.nonzero(status == NEGATIVE).reshape(-1).tolist()) == best_bg
    assert info["n_pos"] == 3 and info["n_neg"] == 2
    assert info["n_pos_candidates"] == 8 and info["n_neg_candidates"] == 8

    # Random caps respect the counts and are reproducible under a seed.
    a, _ = feature_matching_prompts(
        ref, mask, tgt, cap="random", generator=torch.Generator().manual_seed(0), max_pos=3, max_neg=2
    )
    b, _ = feature_matching_prompts(
        ref, mask, tgt, cap="random", generator=torch.Generator().manual_seed(0), max_pos=3, max_neg=2
    )
    assert torch.equal(a, b) and int((a == POSITIVE).sum()) == 3 and int((a == NEGATIVE).sum()) == 2
    assert set(torch.nonzero(a == POSITIVE).reshape(-1).tolist()) <= set(fg_nodes)


def test_feature_matching_validates_inputs() -> None:
    ref = _basis_tokens(3)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="channels"):
        feature_matching_prompts(ref, mask, torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="tgt_tokens"):
        feature_matching_prompts(ref, mask, torch.zeros(9, 9))
    with pytest.raises(ValueError, match="metric"):
        feature_matching_prompts(ref, mask, ref, metric="dot")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- random and clicks
def test_random_prompts_counts_and_seed() -> None:
    a = random_prompts(6, 4, 3, torch.Generator().manual_seed(7))
    b = random_prompts(6, 4, 3, torch.Generator().manual_seed(7))
    c = random_prompts(6, 4, 3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((a == POSITIVE).sum()) == 4 and int((a == NEGATIVE).sum()) == 3 and a.shape == (36,)
    with pytest.raises(ValueError, match="n_pos"):
        random_prompts(2, 3, 2)


def test_click_prompts_snap_to_nearest_centre() -> None:
    grid, H, W = 4, 40, 80  # cells are 20 px wide, 10 px high
    points = torch.tensor([[0.0, 0.0], [79.9, 39.9], [25.0, 14.0], [80.0, 40.0], [39.0, 19.0]])
    labels = torch.tensor([1, 0, 1, 1, -1])
    status = click_prompts(points, labels, grid, H, W)
    expected = torch.zeros(16, dtype=torch.long)
    expected[0] = POSITIVE
    expected[15] = POSITIVE  # (79.9, 39.9) negative, then (80, 40) on the border overwrites it
    expected[1 * 4 + 1] = POSITIVE
    assert torch.equal(status, expected)  # the padding click (-1) on node 5 did not overwrite it
    # Later clicks overwrite earlier ones.
    over = click_prompts(np.array([[25.0, 14.0], [30.0, 11.0]]), np.array([1, 0]), grid, H, W)
    assert over[5] == NEGATIVE and int((over > 0).sum()) == 1
    with pytest.raises(ValueError, match="outside"):
        click_prompts(torch.tensor([[81.0, 5.0]]), torch.tensor([1]), grid, H, W)
    with pytest.raises(ValueError, match="labels"):
        click_prompts(torch.tensor([[1.0, 5.0]]), torch.tensor([2]), grid, H, W)


def test_click_snapping_matches_brute_force_nearest_centre() -> None:
    grid, H, W = 7, 53, 91
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(200, 2, generator=gen) * torch.tensor([W, H])
    centres = node_positions(grid, H, W)
    for p in points:
        status = click_prompts(p[None], torch.tensor([1]), grid, H, W)
        # Nearest centre per axis (grid centres are separable), compared with a brute-force argmin.
        d = (centres - p).abs()
        nearest_col = int(d[:grid, 0].argmin())
        nearest_row = int(d[::grid, 1].argmin())
        assert int(status.argmax()) == nearest_row * grid + nearest_col


def test_status_to_points_round_trip() -> None:
    grid, H, W = 8, 123, 77
    status = random_prompts(grid, 9, 6, torch.Generator().manual_seed(4))
    points, labels = status_to_points(status, grid, H, W)
    assert points.shape == (15, 2) and points.dtype == torch.float32 and labels.dtype == torch.long
    active = torch.nonzero(status).reshape(-1)
    torch.testing.assert_close(points, node_positions(grid, H, W)[active])  # node order
    assert labels.tolist() == [1 if s == POSITIVE else 0 for s in status[active].tolist()]
    assert torch.equal(click_prompts(points, labels, grid, H, W), status)
    empty_pts, empty_lab = status_to_points(torch.zeros(64, dtype=torch.long), grid, H, W)
    assert empty_pts.shape == (0, 2) and empty_lab.shape == (0,)
    with pytest.raises(ValueError, match="status"):
        status_to_points(torch.zeros(63, dtype=torch.long), grid, H, W)


# -------------------------------------------------------------------------------------------- persam
def test_persam_prompts_pick_most_and_least_similar() -> None:
    grid, c = 4, 8
    gen = torch.Generator().manual_seed(0)
    proto = torch.nn.functional.normalize(torch.randn(c, generator=gen), dim=0)
    ref = torch.randn(grid, grid, c, generator=gen) * 0.1
    fg_nodes = [5, 6, 9, 10]
    ref.reshape(-1, c)[fg_nodes] = proto * 3
    tgt = torch.randn(grid, grid, c, generator=gen) * 0.1
    tgt.reshape(-1, c)[12] = proto * 0.5 + 0.001
    tgt.reshape(-1, c)[3] = -proto
    status = persam_prompts(ref, _mask_from_nodes(fg_nodes, grid), tgt)
    assert status[12] == POSITIVE and status[3] == NEGATIVE and int((status > 0).sum()) == 2
    with pytest.raises(ValueError, match="empty"):
        persam_prompts(ref, torch.zeros(16, 16, dtype=torch.bool), tgt)
