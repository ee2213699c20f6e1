"""FM variants (issue 24): paper / mutual / gfsam selection rules, the GF-SAM-style row and its gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ppd.env.fm_variants import DEFAULT_FM_VARIANT, FM_PRESETS, gfsam_maps, gfsam_points, mutual_matches
from ppd.env.graph import node_positions
from ppd.env.prompts import feature_matching_prompts, prompts_from_reference
from ppd.eval import Evaluator
from ppd.eval.cache import status_from_code
from ppd.eval.methods.gf_sam import gf_sam_select
from ppd.types import INACTIVE, NEGATIVE, POSITIVE
from tests.helpers.defender import TINY_ENV, box_mask
from tests.helpers.synthetic import HEIGHT, WIDTH, synthetic_pair
from tests.unit.test_evaluate import _dice, _setup, box_sam  # noqa: F401  (fixture)


def _basis_tokens(grid: int, scale: float = 10.0) -> torch.Tensor:
    n = grid * grid
    return (torch.eye(n) * scale).reshape(grid, grid, n)


# ----------------------------------------------------------------------------------------------- paper
def test_paper_uses_only_patches_fully_inside_or_outside() -> None:
    grid, cell = 4, 4
    ref = _basis_tokens(grid)
    mask = torch.zeros(grid * cell, grid * cell, dtype=torch.bool)
    mask[4:8, 4:8] = True  # node 5 fully inside
    mask[4:8, 8:10] = True  # node 6 half covered (its centre pixel (6, 10) is outside)
    mask[8:12, 4:7] = True  # node 9 three quarters covered (its centre pixel (10, 6) is inside)
    status, info = feature_matching_prompts(ref, mask, ref, variant="paper", max_pos=None, max_neg=None)
    expected = torch.full((16,), NEGATIVE)
    expected[5] = POSITIVE
    expected[[6, 9]] = INACTIVE  # partly covered patches take no part
    assert torch.equal(status, expected)
    assert info["n_ref_fg"] == 1 and info["n_ref_bg"] == 13 and info["variant"] == "paper"
    # today's rule uses every patch, labelled by its centre: node 9 positive, node 6 negative
    near, _ = feature_matching_prompts(ref, mask, ref, max_pos=None, max_neg=None)
    assert near[9] == POSITIVE and near[6] == NEGATIVE and near[5] == POSITIVE


# ---------------------------------------------------------------------------------------------- mutual
def _mutual_dist() -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 0-3 foreground, 4 background; target 2's reverse match is the background patch 4."""
    big = 9.0
    dist = torch.full((5, 5), big)
    dist[0, 0] = dist[1, 1] = 0.0
    dist[2, 2] = 0.5  # forward 2 -> 2 (0.5), but target 2 is closer to background patch 4 (0.1)
    dist[4, 2] = 0.1
    dist[3, 3] = 6.0  # forward 3 -> 3 (6.0), reverse 3 -> 3: kept, but far
    return dist, torch.tensor([True, True, True, True, False])


def test_mutual_reverse_check_and_hard_negatives() -> None:
    dist, fg = _mutual_dist()
    cand = mutual_matches(dist, fg)
    pos = torch.isfinite(cand.pos_score).nonzero().reshape(-1).tolist()
    neg = torch.isfinite(cand.neg_score).nonzero().reshape(-1).tolist()
    # forward distances 0, 0, 0.5, 6 (mean 1.625): target 2 fails the reverse check and is closer than the
    # mean -> hard negative; targets 0, 1, 3 pass
    assert pos == [0, 1, 3] and neg == [2] and cand.n_rejected == 1
    assert mutual_matches(dist, fg, hard_negatives=False).neg_score.isinf().all()
    # more than prune_above kept pairs: the best prune_keep fraction survives (ties: forward order)
    pruned = mutual_matches(dist, fg, prune_above=2, prune_keep=0.5)
    assert torch.isfinite(pruned.pos_score).nonzero().reshape(-1).tolist() == [0]


def test_mutual_on_permuted_tokens_recovers_the_foreground() -> None:
    grid, n = 4, 16
    ref = _basis_tokens(grid)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    tgt = ref.reshape(n, -1)[perm].reshape(grid, grid, -1)
    fg_nodes = [1, 2, 5, 6]
    mask = torch.zeros(16, 16, dtype=torch.bool)
    for node in fg_nodes:
        r, c = divmod(node, grid)
        mask[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = True
    status, info = feature_matching_prompts(ref, mask, tgt, **FM_PRESETS["mutual"])
    expected = torch.zeros(n, dtype=torch.long)
    expected[torch.isin(perm, torch.tensor(fg_nodes))] = POSITIVE
    assert torch.equal(status, expected) and info["n_cycle_rejected"] == 0


# ----------------------------------------------------------------------------------------------- gfsam
def test_gfsam_maps_match_their_definition() -> None:
    g = torch.Generator().manual_seed(1)
    ref, tgt = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
    w = torch.tensor([1.0, 0.5, 0, 0, 1, 0, 0, 0.25, 0])
    maps = gfsam_maps(ref, w, tgt)
    for t in range(7):
        sims = [float(F.cosine_similarity(ref[r], tgt[t], dim=0)) for r in range(9)]
        assert float(maps["max_fg"][t]) == pytest.approx(
            max(s * float(w[r]) for r, s in enumerate(sims)), abs=1e-5
        )
        mean_fg = sum(s * float(w[r]) for r, s in enumerate(sims)) / float(w.sum())
        mean_bg = sum(s * (1 - float(w[r])) for r, s in enumerate(sims)) / float((1 - w).sum())
        assert float(maps["mean_fg"][t]) == pytest.approx(mean_fg, abs=1e-5)
        assert float(maps["mean_bg"][t]) == pytest.approx(mean_bg, abs=1e-5)
    prod = maps["max_fg"] * maps["mean_fg"]
    fg = (prod - prod.min()) / (prod.max() - prod.min() + 1e-6)
    bg = (maps["mean_bg"] - maps["mean_bg"].min()) / (maps["mean_bg"].max() - maps["mean_bg"].min() + 1e-6)
    assert torch.allclose(maps["fg"], fg, atol=1e-6)
    assert torch.allclose(maps["filtered"], torch.where(bg > fg, 0.0, fg), atol=1e-6)


def test_gfsam_adaptive_k() -> None:
    m = torch.tensor([0.2, 0.9, 0.0, 0.8, 0.7, 0.1])  # sum 2.7 -> k = 2, the two best
    assert gfsam_points(m).tolist() == [1, 3]
    assert gfsam_points(m, max_points=1).tolist() == [1]
    assert gfsam_points(torch.tensor([0.0, 0.3, 0.0])).tolist() == [1]  # 0 < sum < 1 -> one point
    assert gfsam_points(torch.zeros(4)).numel() == 0


def test_gfsam_variant_gives_the_selected_positives_only() -> None:
    g = torch.Generator().manual_seed(2)
    ref, tgt = torch.randn(4, 4, 6, generator=g), torch.randn(4, 4, 6, generator=g)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8, :8] = True
    status, info = feature_matching_prompts(ref, mask, tgt, **FM_PRESETS["gfsam"])
    w = mask.float().reshape(4, 4, 4, 4).mean((1, 3)).reshape(-1)
    sel = gfsam_points(gfsam_maps(ref.reshape(16, 6), w, tgt.reshape(16, 6))["filtered"])
    assert sorted((status == POSITIVE).nonzero().reshape(-1).tolist()) == sorted(sel.tolist())
    assert int((status == NEGATIVE).sum()) == 0 and info["n_pos"] == sel.numel() > 0


def test_variant_arguments_are_checked() -> None:
    ref = _basis_tokens(3)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="variant"):
        feature_matching_prompts(ref, mask, ref, variant="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bidirectional"):
        feature_matching_prompts(ref, mask, ref, variant="mutual", bidirectional=True)
    with pytest.raises(ValueError, match="prune_keep"):
        feature_matching_prompts(ref, mask, ref, variant="mutual", prune_keep=0.0)


# -------------------------------------------------------------------------------------------- gf_sam
def _gate_example() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Grid 4: points at nodes 0, 1 (masks over the top-left block) and 15 (mask over nodes 14, 15)."""
    n = 16
    block = [0, 1, 4, 5]
    cover = torch.zeros(3, n)
    cover[0, block] = 1.0
    cover[1, block] = 1.0
    cover[2, [14, 15]] = 1.0
    mean_fg = torch.full((n,), 0.1)
    mean_fg[block] = 0.9
    mean_bg = torch.full((n,), 0.5)
    maps = {"mean_fg": mean_fg, "mean_bg": mean_bg}
    tokens = torch.zeros(n, 2)
    tokens[:, 1] = 1.0
    tokens[block] = torch.tensor([1.0, 0.0])
    return cover, maps, torch.tensor([0, 1, 15]), tokens


def test_gf_sam_gates_keep_the_positive_cluster() -> None:
    cover, maps, points, tokens = _gate_example()
    keep, info = gf_sam_select(cover, maps, points, tokens, grid=4)
    # mid = 0.5: positive nodes where 0.81 > 0.25 (the block) vs 0.01 < 0.25 elsewhere
    assert info["n_clusters"] == 2 and info["n_gated"] == 1 and not info["fallback"]
    # the second mask of the block adds no new area (growth needs pos > neg of the *new* area), and the
    # mask over nodes 14, 15 is all negative: only point 0 passes positive gating
    assert keep.tolist() == [True, False, False]


def test_gf_sam_falls_back_to_the_best_candidate() -> None:
    cover, maps, points, tokens = _gate_example()
    maps = {"mean_fg": torch.full((16,), 0.1), "mean_bg": torch.full((16,), 0.9)}  # nothing positive
    keep, info = gf_sam_select(cover, maps, points, tokens, grid=4)
    assert info["fallback"] and int(keep.sum()) == 1


def test_fm_rows_and_gf_sam_row_in_the_harness(tmp_path: Path, tiny_sam, box_sam) -> None:  # noqa: F811
    methods = ["feature_matching", "fm_nearest", "fm_paper", "fm_mutual", "fm_gfsam", "gf_sam"]
    cfg, defender = _setup(tmp_path, tiny_sam, methods)
    res = Evaluator(cfg, defender=defender, progress=False).run()
    sec = res["datasets"][0]
    caches = {
        p.name.split("__")[0]: json.loads(p.read_text()) for p in (tmp_path / "out" / "cache").iterdir()
    }
    grid = TINY_ENV["grid"]
    ref_img, ref_mask = synthetic_pair(2)
    cache = defender.cache
    ref_tokens = cache.get(ref_img).dino_tokens
    for s in ("0", "1", "3", "4"):
        img, gt = synthetic_pair(int(s))
        tokens = cache.get(img).dino_tokens
        for v in ("nearest", "paper", "mutual", "gfsam"):
            want, _ = prompts_from_reference(ref_tokens, ref_mask, tokens, grid, **FM_PRESETS[v])
            got = status_from_code(caches[f"fm_{v}"]["records"][s]["status"])
            assert torch.equal(got, want), (v, s)
        # the config has no feature_matching block: the row uses the dev-chosen default variant
        default = caches[f"fm_{DEFAULT_FM_VARIANT}"]["records"][s]["status"]
        assert caches["feature_matching"]["records"][s]["status"] == default
        # gf_sam: its mask is the union of the single-point masks of the kept points, which are gfsam points
        rec = caches["gf_sam"]["records"][s]
        gfsam_pos = set(
            (status_from_code(caches["fm_gfsam"]["records"][s]["status"]) == POSITIVE)
            .nonzero()
            .reshape(-1)
            .tolist()
        )
        assert rec["n_kept"] >= 1 and set(rec["kept_nodes"]) <= gfsam_pos
        xy = node_positions(grid, HEIGHT, WIDTH)[rec["kept_nodes"]].numpy()
        union = np.zeros((HEIGHT, WIDTH), bool)
        for p in xy:
            union |= box_mask(p[None], np.array([1]), HEIGHT, WIDTH)
        assert sec["methods"]["gf_sam"]["per_image"][s]["dice"] == pytest.approx(_dice(union, gt), abs=1e-6)


def test_default_variant_is_the_one_chosen_on_dev() -> None:
    """The default of eval configs is the variant the committed dev selection chose (never a val choice)."""
    import re

    from ppd.env.fm_variants import default_fm_options
    from ppd.eval import EvalConfig

    text = (Path(__file__).parents[2] / "experiments/results/fm_dev_select.md").read_text()
    chosen = re.search(r"\*\*Chosen: `(\w+)` at G = (\d+)\*\*", text)
    assert chosen is not None and chosen.group(1) == DEFAULT_FM_VARIANT
    cfg = EvalConfig(output_dir="o", datasets=[])
    assert (
        cfg.feature_matching == FM_PRESETS[DEFAULT_FM_VARIANT]
        and cfg.feature_matching is not default_fm_options()
    )


def _results(dice: dict[str, float], ref: str) -> dict:
    """A minimal ``results.json`` of one data set and one row."""
    per = {s: {"dice": d, "iou": d} for s, d in dice.items()}
    return {
        "datasets": [
            {"dataset": {"name": "cvc"}, "reference": {"stem": ref}, "methods": {"fm": {"per_image": per}}}
        ]
    }


def test_grid_compare_pairs_images_by_stem() -> None:
    import importlib.util

    path = Path(__file__).parents[2] / "experiments/fm_grid_compare.py"
    spec = importlib.util.spec_from_file_location("fm_grid_compare", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = _results({"1": 0.9, "2": 0.5, "3": 0.7}, "0")
    b = _results({"2": 0.1, "1": 0.6, "4": 0.2}, "0")  # other order; "3" / "4" only in one run
    row = [line for line in mod.compare(a, b, ("a", "b")) if line.startswith("| fm |")]
    # images 1 and 2: differences 0.3 and 0.4 -> mean +0.350
    assert row == [row[0]] and row[0].startswith("| fm | 2 | 0.700 | 0.350 | +0.350 [")
    with pytest.raises(SystemExit, match="different references"):
        mod.compare(a, _results({"1": 0.1}, "9"), ("a", "b"))
