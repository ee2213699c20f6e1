"""The Actor's levers against independent expectations (no Lightning): start-kind counts, FM starts, active
budgets, phases and target syncs; and the oracle margin loss only on the defender's updates."""

from __future__ import annotations

import pytest
import torch

from ppd.env.prompt_env import PromptEnv
from ppd.rl.actor import Actor, DefenceStarts, warm_start
from ppd.rl.agent import build_agent
from ppd.rl.replay import ReplayBuffer
from tests.unit import test_env as _test_env

env = _test_env.env  # the tiny-env fixture of tests/unit/test_env.py
G = _test_env.G


def _agents(env: PromptEnv) -> dict:
    c = env.features[0].dino_tokens.shape[-1]
    torch.manual_seed(0)
    return {
        r: build_agent(r, "dense", in_dim=c + 5, hidden=8, layers=1, heads=1) for r in ("attack", "defend")
    }


def _fm(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A stand-in for ``feature_matching_starts``: one random positive node per image, drawn from ``generator``."""
    out = torch.zeros(len(ids), G * G, dtype=torch.long)
    out[torch.arange(len(ids)), torch.randint(G * G, (len(ids),), generator=generator)] = 1
    return out


def test_defence_start_mixture_counts_fm_draws_and_active_budgets(env: PromptEnv) -> None:
    starts = DefenceStarts({"greedy": 1.0, "random": 1.0, "feature_matching": 2.0}, budget="active")
    actor = Actor(_agents(env), starts, seed=3, target_sync_every=100, feature_matching_starts=_fm)
    ideal = _test_env._ideal(env, list(range(len(env))))
    n = len(env)
    actor.start_attack(env, ideal, envs=n)
    ids, attack_budgets = env.image_ids.clone(), env.budget.clone()
    # the expected draws, from a copy of the actor's generator: kinds, then per kind the FM / attack draws
    g = torch.Generator()
    g.set_state(actor.generator.get_state())
    kinds = torch.multinomial(torch.tensor([1.0, 1.0, 2.0]), n, replacement=True, generator=g)
    greedy_rows, random_rows, fm_rows = ((kinds == k).nonzero().squeeze(1) for k in range(3))
    agent = actor.agents["attack"]
    sel = ideal[ids]
    want = torch.zeros(n, G * G, dtype=torch.long)
    want[greedy_rows] = agent.final_status(
        agent.inputs(env), ids[greedy_rows], sel[greedy_rows], attack_budgets[greedy_rows], 0.0, g
    )
    want[random_rows] = agent.final_status(
        agent.inputs(env),
        ids[random_rows],
        sel[random_rows],
        attack_budgets[random_rows],
        0.0,
        g,
        random=True,
    )
    want[fm_rows] = _fm(ids[fm_rows], g)
    actor.start_defence(env)
    assert actor.phase == "defend"
    assert starts.names == ["greedy", "random", "feature_matching"]
    assert torch.equal(env.image_ids, ids)
    assert torch.equal(env.status, want)  # every row is the start its drawn kind gives
    # FM starts have exactly one active (positive) node: their active budget is 1
    assert torch.equal(env.budget, (want != 0).sum(1).clamp_min(1))
    assert env.budget[fm_rows].tolist() == [1] * len(fm_rows)


def test_paper_starts_draw_nothing_and_keep_the_attack_budget(env: PromptEnv) -> None:
    actor = Actor(_agents(env), DefenceStarts(), seed=1, target_sync_every=100)
    ideal = _test_env._ideal(env, list(range(len(env))))
    actor.start_attack(env, ideal, envs=2)
    budgets = env.budget.clone()
    state = actor.generator.get_state()
    agent = actor.agents["attack"]
    g = torch.Generator()
    g.set_state(state)
    want = agent.final_status(agent.inputs(env), env.image_ids, ideal[env.image_ids], budgets, 0.0, g)
    actor.start_defence(env)
    assert torch.equal(env.status, want)
    assert torch.equal(env.budget, budgets)
    assert torch.equal(actor.generator.get_state(), g.get_state())  # a greedy roll-out draws nothing


def test_episode_phases_counters_and_target_sync(env: PromptEnv) -> None:
    agents = _agents(env)
    actor = Actor(agents, DefenceStarts(), seed=0, target_sync_every=2)
    ideal = _test_env._ideal(env, list(range(len(env))))
    actor.setup_buffers(100, G * G, sample_seed=0)
    buffers = actor.buffers
    with torch.no_grad():
        agents["attack"].online.input.bias.add_(1.0)  # online != target until a sync
    phases, ended = [], []
    while len(ended) < 2:
        phases.append(actor.phase)
        out = actor.step(env, ideal, 2, epsilon=0.5)
        if out.ended:
            ended.append(out.ended)
        if actor.env_steps == 1:
            assert not torch.equal(agents["attack"].online.input.bias, agents["attack"].target.input.bias)
        if actor.env_steps == 2:
            assert torch.equal(agents["attack"].online.input.bias, agents["attack"].target.input.bias)
    assert ended == ["attack", "defend"] and actor.episode == 1 and actor.phase is None
    assert phases[0] is None and "attack" in phases and "defend" in phases
    assert actor.transitions == len(buffers["attack"]) + len(buffers["defend"])


def test_warm_start_fills_both_buffers_and_resume_state_round_trips(env: PromptEnv) -> None:
    ideal = _test_env._ideal(env, list(range(len(env))))
    buffers = {r: ReplayBuffer(200, G * G) for r in ("attack", "defend")}
    warm_start(env, ideal, buffers, need=12, envs=2, seed=5)
    assert len(buffers["attack"]) >= 12 and len(buffers["defend"]) >= 12
    actor = Actor(_agents(env), DefenceStarts(), seed=0, target_sync_every=100)
    actor.setup_buffers(200, G * G, sample_seed=7)
    actor.buffers = buffers  # the warm-started buffers
    actor.step(env, ideal, 2, epsilon=0.5)
    actor.sample("defend", 4)  # advances the sampling RNG
    st = actor.state_dict(env, buffers=True)
    assert "buffers" not in actor.state_dict(env)  # only with save_buffers
    again = Actor(_agents(env), DefenceStarts(), seed=99, target_sync_every=100)
    again.load_state_dict(st, transitions=actor.transitions)
    again.setup_buffers(200, G * G, sample_seed=123)  # after a restore: neither reseeds nor empties
    assert again.phase == actor.phase and again.episode == actor.episode
    assert torch.equal(again.generator.get_state(), actor.generator.get_state())
    for role in ("attack", "defend"):
        a, b = again.buffers[role].state_dict(), buffers[role].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = again.sample("attack", 8), actor.sample("attack", 8)  # the same replay stream continues
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(again.pending_env_state["status"], env.status)
    st_done = {**st, "env_state": None}
    restarted = Actor(_agents(env), DefenceStarts(), seed=0, target_sync_every=100)
    restarted.load_state_dict(st_done, transitions=0)
    assert restarted.phase is None  # without the env state the episode restarts


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": {"greedy": 1.0, "fm": 1.0}}, "unknown"),
        ({"weights": {"greedy": -1.0}}, "non-negative"),
        ({"budget": "all"}, "defend_budget"),
    ],
)
def test_bad_defence_starts_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DefenceStarts(**kwargs)


@pytest.mark.parametrize("role", ["attack", "defend"])
def test_oracle_margin_loss_only_on_the_defender(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PPDTask update adds the margin term (and logs it) on the defender's updates only."""
    from types import SimpleNamespace

    import ppd.rl.losses as losses_mod
    from ppd.tasks.ppd import PPDTask

    task = PPDTask(feature_dim=13, hidden=8, layers=1, heads=1, oracle_margin_weight=1.0)
    calls: list[str] = []
    real = losses_mod.oracle_margin_loss

    def spy(*args, **kw):
        calls.append(role)
        return real(*args, **kw)

    monkeypatch.setattr(losses_mod, "oracle_margin_loss", spy)
    logged: dict[str, float] = {}
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    n = 4
    status = torch.tensor([[1, 2, 0, 1]])
    sample = {
        "image_id": torch.tensor([0]),
        "status": status,
        "action": torch.tensor([0 if role == "defend" else 4]),
        "reward": torch.tensor([0.1]),
        "next_status": torch.tensor([[0, 2, 0, 1]]) if role == "defend" else torch.tensor([[1, 2, 1, 1]]),
        "done": torch.tensor([False]),
    }
    opts = task.configure_optimizers()
    task.td_step = lambda r, s, return_q=False: (
        torch.tensor(0.5, requires_grad=True),
        torch.tensor(0.0),
        *((torch.zeros(1, n, requires_grad=True),) if return_q else ()),
    )
    dm = SimpleNamespace(node_fg=torch.tensor([[True, True, False, False]]))
    task._trainer = SimpleNamespace(datamodule=dm, world_size=1)
    monkeypatch.setattr(task, "optimizers", lambda: opts)
    monkeypatch.setattr(task, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(task, "clip_gradients", lambda *a, **k: None)
    task._update(role, sample)
    assert calls == (["defend"] if role == "defend" else [])
    assert ("train/oracle_margin_loss" in logged) == (role == "defend")


def test_aux_loss_option_group_is_checked_once_and_weights_the_margin() -> None:
    from ppd.rl.losses import AuxLoss, oracle_margin_loss
    from ppd.tasks.ppd import PPDTask

    with pytest.raises(ValueError, match="PPDTask: oracle_margin_weight must be >= 0, got -1"):
        PPDTask(feature_dim=13, hidden=8, layers=1, heads=1, oracle_margin_weight=-1.0)
    with pytest.raises(ValueError, match="oracle_margin must be >= 0"):
        AuxLoss(1.0, float("nan"))
    assert not AuxLoss().applies_to("defend") and not AuxLoss(2.0).applies_to("attack")
    q = torch.tensor([[0.3, -0.2, 0.1, 0.0]])
    status, fg = torch.tensor([[1, 2, 0, 1]]), torch.tensor([[True, True, False, False]])
    weighted, margin = AuxLoss(2.0, 0.1).weighted(q, status, fg)
    assert torch.equal(margin, oracle_margin_loss(q, status, fg, 0.1)) and float(margin) > 0
    assert torch.equal(weighted, 2.0 * margin)
