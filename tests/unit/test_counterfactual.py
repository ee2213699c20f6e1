"""Counterfactual (all-action) rewards, SAM node inputs, tables on disk and the two losses (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppd.env.prompt_env import INACTIVE, NEGATIVE, POSITIVE, SAM_NODE_FEATURES, PromptEnv, sam_node_features
from ppd.env.prompts import ideal_prompts
from ppd.rl.counterfactual import (
    check_settings,
    generate_shard,
    load_tables,
    perturb_state,
    removal_rewards,
    removal_successors,
    shard_path,
    write_tables,
)
from ppd.rl.losses import counterfactual_regression_loss, listwise_ranking_loss
from ppd.rl.rollout import greedy_defence

G = 8


@pytest.fixture()
def env(tiny_sam, tiny_env_inputs) -> PromptEnv:
    feats, masks = tiny_env_inputs
    return PromptEnv(tiny_sam, feats, masks, grid=G, k_feature=4, k_physical=4, budget_range=(3, 5))


def _starts(env: PromptEnv, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ideal prompts with two labels flipped: a start state with harmful prompts."""
    out = []
    for i in ids.tolist():
        st = ideal_prompts(env.masks[i], G, 1, 3, 3, generator=generator).long()
        act = (st != INACTIVE).nonzero().squeeze(1)[:2]
        st[act] = torch.where(st[act] == POSITIVE, torch.tensor(NEGATIVE), torch.tensor(POSITIVE))
        out.append(st)
    return torch.stack(out)


def test_removal_successors_remove_exactly_one_active_node() -> None:
    status = torch.tensor([[0, 1, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rows, nodes, succ = removal_successors(status)
    assert rows.tolist() == [0, 0, 1] and nodes.tolist() == [1, 2, 0]
    assert succ.tolist() == [[0, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_removal_rewards_equal_the_environment_step_rewards(env: PromptEnv) -> None:
    ids = torch.tensor([0, 1, 2])
    start = _starts(env, ids, torch.Generator().manual_seed(0))
    cf = removal_rewards(env, ids, start)
    assert cf.rewards.shape == start.shape and cf.sam.shape == (3, G * G, len(SAM_NODE_FEATURES))
    assert torch.equal(torch.isnan(cf.rewards), start == INACTIVE)  # one label per valid action, none else
    torch.testing.assert_close(cf.dice, env.dice_of(ids, start))
    # every label is the reward a real environment step returns for that action
    for b in range(3):
        for node in (start[b] != INACTIVE).nonzero().squeeze(1).tolist():
            env.reset(ids[b : b + 1], start[b : b + 1], budget=torch.tensor([5]))
            res = env.step_defend(torch.tensor([node]))
            assert float(res.reward[0]) == pytest.approx(float(cf.rewards[b, node]), abs=1e-6)


def test_sam_node_features_pool_the_probability_map() -> None:
    logits = torch.full((2, 256, 256), -30.0)
    logits[0, :64, :64] = 30.0  # top-left quarter of a 128 x 128 valid region = top-left 4 x 4 nodes of G = 8
    logits[1] = float("-inf")  # no active prompt
    f = sam_node_features(logits, (128, 128), G)
    assert f.shape == (2, G * G, 3)
    patch = f[0, :, 0].reshape(G, G)
    assert torch.allclose(patch[:4, :4], torch.ones(4, 4), atol=1e-6)
    assert torch.allclose(patch[4:, :], torch.zeros(4, G), atol=1e-6)
    assert float(f[0, 0, 2]) == pytest.approx(0.25)  # area fraction, the same at every node
    nb = f[0, :, 1].reshape(G, G)
    assert float(nb[0, 0]) == pytest.approx(1.0) and float(nb[3, 3]) == pytest.approx(4 / 9)
    assert torch.equal(f[1], torch.zeros(G * G, 3))


def test_perturb_state_keeps_a_prompt_and_only_touches_valid_nodes() -> None:
    g = torch.Generator().manual_seed(0)
    st = torch.zeros(G * G, dtype=torch.long)
    st[[3, 9, 20]] = torch.tensor([POSITIVE, NEGATIVE, POSITIVE])
    for _ in range(20):
        p = perturb_state(st, g)
        assert int((p != INACTIVE).sum()) >= 2  # at most a third dropped
        assert set(p.unique().tolist()) <= {INACTIVE, POSITIVE, NEGATIVE}


def test_generate_shard_follows_the_oracle_and_labels_every_state(env: PromptEnv) -> None:
    g = torch.Generator().manual_seed(1)
    tab = generate_shard(
        env,
        torch.tensor([0, 1]),
        lambda ids, gen: _starts(env, ids, gen),
        g,
        references_per_image=1,
        steps=2,
        explore=0.0,
        perturb=0.0,
    )
    assert tab["status"].dtype == torch.int8 and tab["rewards"].dtype == torch.float16
    n = len(tab["image_ids"])
    assert n == 6  # 2 images x (start + 2 oracle steps)
    for img in (0, 1):
        rows = (tab["image_ids"] == img).nonzero().squeeze(1)
        st, r = tab["status"][rows].long(), tab["rewards"][rows].float()
        for t in range(2):  # the next state = this one minus its best removal (explore = 0)
            best = int(torch.where(torch.isnan(r[t]), torch.tensor(-9.0), r[t]).argmax())
            expect = st[t].clone()
            expect[best] = INACTIVE
            assert torch.equal(st[t + 1], expect)
        # the Dice after the best removal is the next state's Dice
        nxt = float(tab["dice"][rows][1])
        assert float(tab["dice"][rows][0]) + float(torch.nan_to_num(r[0], nan=-9).max()) == pytest.approx(
            nxt, abs=2e-3
        )


def test_tables_resume_and_refuse_other_settings(env: PromptEnv, tmp_path: Path) -> None:
    stems = [f"set/img{i}" for i in range(4)]
    settings = {"grid": G, "steps": 1}
    kw = dict(references_per_image=1, steps=1, explore=0.5, perturb=0.5, progress=False)
    starts = lambda ids, gen: _starts(env, ids, gen)  # noqa: E731
    a = write_tables(tmp_path / "a", env, stems, starts, settings, seed=3, shard_size=3, **kw)
    assert a["shards_written"] == 2 and a["decodes"] > 0
    again = write_tables(tmp_path / "a", env, stems, starts, settings, seed=3, shard_size=3, **kw)
    assert again["shards_written"] == 0  # resumed: nothing recomputed
    # two workers write the same shards as one process
    for w in (0, 1):
        write_tables(tmp_path / "b", env, stems, starts, settings, seed=3, shard_size=3, worker=(w, 2), **kw)
    ta, tb = load_tables(tmp_path / "a", settings, stems), load_tables(tmp_path / "b", settings, stems)
    for k in ("image_ids", "status", "dice"):
        assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(torch.isnan(ta["rewards"]), ta["status"] == INACTIVE)
    with pytest.raises(ValueError, match="other settings"):
        load_tables(tmp_path / "a", {"grid": G, "steps": 2}, stems)
    with pytest.raises(ValueError, match="not among the configured"):
        load_tables(tmp_path / "a", settings, stems[:2])
    with pytest.raises(FileNotFoundError, match="no counterfactual table shards"):
        load_tables(tmp_path / "empty", settings, stems)
    with pytest.raises(ValueError, match="not a counterfactual table shard"):
        check_settings(shard_path(tmp_path, 0), {"format": "x"}, settings)


def test_regression_loss_ignores_invalid_actions() -> None:
    q = torch.tensor([[0.1, 0.5, 9.0], [0.0, 0.2, -0.3]])
    r = torch.tensor([[0.0, 0.5, float("nan")], [float("nan"), float("nan"), 0.1]])
    expect = ((0.1 - 0.0) ** 2 + 0.0 + (-0.3 - 0.1) ** 2) / 3
    assert float(counterfactual_regression_loss(q, r)) == pytest.approx(expect)
    assert float(counterfactual_regression_loss(q, torch.full_like(q, float("nan")))) == 0.0


def test_ranking_loss_is_listnet_cross_entropy_and_prefers_the_right_order() -> None:
    r = torch.tensor([[0.1, -0.05, float("nan"), 0.0], [float("nan"), 0.2, float("nan"), float("nan")]])
    good = torch.tensor([[1.0, -1.0, 50.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    bad = torch.tensor([[-1.0, 1.0, 50.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = 0.05
    # reference on the valid actions of row 0 only (row 1 has a single action: no ranking)
    v = torch.tensor([0, 1, 3])
    ref = -(torch.softmax(r[0, v] / t, 0) * torch.log_softmax(good[0, v] / t, 0)).sum()
    assert float(listwise_ranking_loss(good, r, t)) == pytest.approx(float(ref), rel=1e-5)
    assert float(listwise_ranking_loss(good, r, t)) < float(listwise_ranking_loss(bad, r, t))
    with pytest.raises(ValueError, match="temperature"):
        listwise_ranking_loss(good, r, 0.0)


def test_greedy_defence_with_sam_inputs_decodes_each_step(env: PromptEnv) -> None:
    from ppd.models.qnet import QNetwork

    torch.manual_seed(0)
    in_dim = env.image(0).x_static.shape[1] + 3 + len(SAM_NODE_FEATURES)
    qnet = QNetwork(in_dim, hidden=8, layers=1, heads=1).eval()
    ids = torch.tensor([0, 1])
    start = _starts(env, ids, torch.Generator().manual_seed(0))
    n0 = env.timings.calls["decode"]
    tr = greedy_defence(env, qnet, ids, start, max_steps=2, sam_inputs=True)
    # one decode per live state and decision: every step, plus the decision that stopped on Q or last positive
    stopped_on_q = sum(r in ("q<=0", "last_positive") for r in tr.stop_reason)
    assert env.timings.calls["decode"] - n0 == int(tr.steps.sum()) + stopped_on_q
    with pytest.raises(
        ValueError, match="takes 3 extra node inputs"
    ):  # the same network without SAM inputs lacks its extra inputs
        greedy_defence(env, qnet, ids, start, max_steps=2, sam_inputs=False)


def test_min_q_threshold_makes_the_defender_more_cautious(env: PromptEnv) -> None:
    from ppd.models.qnet import QNetwork

    torch.manual_seed(0)
    qnet = QNetwork(env.image(0).x_static.shape[1] + 3, hidden=8, layers=1, heads=1).eval()
    ids = torch.tensor([0, 1])
    start = _starts(env, ids, torch.Generator().manual_seed(0))
    never = greedy_defence(env, qnet, ids, start, max_steps=3, min_q=float("inf"))
    assert never.steps.tolist() == [0, 0] and never.stop_reason == ["q<=0", "q<=0"]
    always = greedy_defence(env, qnet, ids, start, max_steps=3, min_q=float("-inf"))
    assert always.steps.tolist() == [3, 3] and always.stop_reason == ["budget", "budget"]
    plain = greedy_defence(env, qnet, ids, start, max_steps=3)
    mid = greedy_defence(env, qnet, ids, start, max_steps=3, min_q=0.0)
    assert torch.equal(plain.status, mid.status)  # 0 is the plain Q > 0 rule


@pytest.mark.parametrize("label_margin_weight", [0.0, 0.5])
def test_counterfactual_task_trains_through_the_dense_path_equal_to_the_pyg_reference(
    env: PromptEnv, monkeypatch: pytest.MonkeyPatch, label_margin_weight: float
) -> None:
    """The task's loss and gradients on a table batch: dense agent (default) = PyG reference within 1e-5."""
    from types import SimpleNamespace

    from ppd.models.qnet_dense import DenseQNetwork
    from ppd.rl.agent import DQNAgent, PygDQNAgent
    from ppd.tasks.counterfactual import CounterfactualDefenderTask

    ids = torch.tensor([0, 1, 2, 1])
    status = _starts(env, ids, torch.Generator().manual_seed(0))
    cf = removal_rewards(env, ids, status)
    fg = torch.rand(status.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    fake_dm = SimpleNamespace(sam_inputs=True, env=env)
    monkeypatch.setattr(CounterfactualDefenderTask, "dm", property(lambda self: fake_dm))
    in_dim = env.image(0).x_static.shape[1] + 3 + len(SAM_NODE_FEATURES)
    kw = dict(feature_dim=in_dim, hidden=16, layers=2, heads=2, label_margin_weight=label_margin_weight)
    torch.manual_seed(0)
    dense = CounterfactualDefenderTask(**kw)
    pyg = CounterfactualDefenderTask(**kw, qnet_impl="pyg")
    pyg.q_def.load_state_dict(dense.q_def.state_dict())
    assert type(dense.agent) is DQNAgent and isinstance(dense.q_def, DenseQNetwork)
    assert type(pyg.agent) is PygDQNAgent and dense.agent.target is dense.q_def  # gamma = 0: no target copy
    # the checkpoint layout ppd.export reads is unchanged: only the q_def network's parameters
    assert dense.state_dict().keys() == pyg.state_dict().keys()
    assert all(k.startswith("q_def.") for k in dense.state_dict())
    sam = cf.sam.half()  # stored as float16 in the tables
    with torch.inference_mode():  # validation's table metrics first: must not poison the training inputs
        q_val = dense._q(env, ids, status.to(torch.int8), sam)
    outs = {}
    for name, task in (("dense", dense), ("pyg", pyg)):
        q = task._q(env, ids, status.to(torch.int8), sam)
        out = task.losses(q, cf.rewards, status, fg)
        out["loss"].backward()
        outs[name] = (q.detach(), {k: v.detach() for k, v in out.items()})
    torch.testing.assert_close(outs["dense"][0], outs["pyg"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(q_val, outs["dense"][0], atol=0, rtol=0)
    assert (
        set(outs["dense"][1])
        == set(outs["pyg"][1])
        == {"mse", "rank", "loss"} | ({"margin"} if label_margin_weight else set())
    )
    for k in outs["dense"][1]:
        torch.testing.assert_close(outs["dense"][1][k], outs["pyg"][1][k], atol=1e-5, rtol=0)
    grads = dict(pyg.q_def.named_parameters())
    n_grads = 0
    for k, p in dense.q_def.named_parameters():
        if p.grad is None:
            assert grads[k].grad is None or float(grads[k].grad.abs().max()) == 0.0, k
            continue
        torch.testing.assert_close(p.grad, grads[k].grad, atol=1e-5, rtol=0)
        n_grads += 1
    assert n_grads > 0 and float(outs["dense"][1]["loss"]) > 0
