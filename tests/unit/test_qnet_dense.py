"""The dense Q-network path against the PyG reference: Q-values, gradients, env observations, actions,
roll-outs, the TD loss and a fixed-seed short training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data

from ppd.env.prompt_env import PromptEnv
from ppd.env.roles import get_role
from ppd.models.qnet import QNetwork, masked_argmax
from ppd.models.qnet_dense import DenseQNetwork, dense_graphs, dense_masked_argmax, neighbour_table
from ppd.rl.agent import DQNAgent, PygDQNAgent, as_agent, q_values, role_mask
from ppd.rl.dense_learner import dense_td_loss
from ppd.rl.losses import double_dqn_next_value, dqn_next_value, td_loss, td_target
from ppd.rl.rollout import greedy_defence, rollout
from tests.unit import test_env as _test_env

DS = 8 + 2  # static features; the network input adds the 3-way status one-hot
N = 9


def random_graph(gen: torch.Generator, n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both relations, random targets; self loops, duplicates, a node without incoming edges (0) and a
    feature-relation hub (node 1 receives from every node, so its table row overflows)."""
    e = 3
    src = torch.cat([torch.arange(n).repeat_interleave(e).repeat(2), torch.arange(n)])
    dst = torch.randint(0, n, (2 * n * e,), generator=gen)
    dst[dst == 0] = 1  # node 0 receives no edge of either relation
    dst = torch.cat([dst, torch.ones(n, dtype=torch.long)])
    et = torch.cat([torch.zeros(n * e), torch.ones(n * e), torch.zeros(n)]).long()
    return torch.stack([src, dst]), torch.rand(len(et), 1, generator=gen), et


def pool(num_images: int, seed: int, split: bool = True):
    gen = torch.Generator().manual_seed(seed)
    graphs = [random_graph(gen) for _ in range(num_images)]
    xs = torch.randn(num_images, N, DS, generator=gen)
    g = [list(t) for t in zip(*graphs, strict=True)]
    dense = dense_graphs(xs, g[0], g[1], g[2], split=split)
    return xs, graphs, dense, gen


def test_row_split_tables_hold_the_same_edges() -> None:
    _, graphs, dense, _ = pool(3, seed=0)
    _, _, full, _ = pool(3, seed=0, split=False)
    assert dense.row_node[0].shape[1] > 0  # the hub overflows
    assert dense.nbr[0].shape[-1] < full.nbr[0].shape[-1]
    for r in range(2):
        for i in range(3):
            v = dense.valid[r][i]
            node = torch.cat([torch.arange(N), dense.row_node[r][i]])
            rows, cols = v.nonzero(as_tuple=True)
            got = sorted(zip(dense.nbr[r][i][rows, cols].tolist(), node[rows].tolist(), strict=True))
            ei, _, et = graphs[i]
            want = sorted(zip(ei[0, et == r].tolist(), ei[1, et == r].tolist(), strict=True))
            assert got == want


def pyg_batch(
    xs, graphs, image: torch.Tensor, status: torch.Tensor, extra: torch.Tensor | None = None
) -> Batch:
    """PyG batch of B states; ``extra (B, N, F)`` is appended last to ``x`` (after the status one-hot)."""
    ex = [torch.zeros(N, 0)] * len(image) if extra is None else list(extra)
    return Batch.from_data_list(
        [
            Data(
                x=torch.cat([xs[i], F.one_hot(status[b], 3).float(), ex[b]], 1),
                edge_index=graphs[i][0],
                edge_attr=graphs[i][1],
                edge_type=graphs[i][2],
            )
            for b, i in enumerate(image.tolist())
        ]
    )


def test_neighbour_table_holds_exactly_the_incoming_edges() -> None:
    gen = torch.Generator().manual_seed(0)
    ei, ea, _ = random_graph(gen)
    nbr, attr, valid = neighbour_table(ei, ea, N)
    assert nbr.shape == attr.shape == valid.shape == (N, int(torch.bincount(ei[1]).max()))
    assert not valid[0].any()  # no incoming edge
    got = sorted((int(nbr[i, k]), i, round(float(attr[i, k]), 6)) for i, k in valid.nonzero().tolist())
    want = sorted(
        (int(s), int(d), round(float(a), 6)) for s, d, a in zip(ei[0], ei[1], ea[:, 0], strict=True)
    )
    assert got == want
    with pytest.raises(ValueError, match="width"):
        neighbour_table(ei, ea, N, width=1)


@pytest.mark.parametrize("conv", ["transformer", "gatv2"])
@pytest.mark.parametrize("out_per_node", [1, 2])
@pytest.mark.parametrize("bsz", [1, 3, 10])  # 10 > state_chunk (8): chunked
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("n_extra", [0, 3])  # 3: the SAM-prediction node inputs (sam_inputs)
def test_dense_equals_pyg_q_values_and_gradients(
    conv: str, out_per_node: int, bsz: int, split: bool, n_extra: int
) -> None:
    xs, graphs, dense, gen = pool(4, seed=bsz, split=split)
    torch.manual_seed(1)
    d = DS + 3 + n_extra
    ref = QNetwork(d, hidden=16, layers=3, heads=2, out_per_node=out_per_node, conv=conv)
    net = DenseQNetwork(d, hidden=16, layers=3, heads=2, out_per_node=out_per_node, conv=conv)
    net.load_state_dict(ref.state_dict())  # same keys both ways
    ref.load_state_dict(net.state_dict())
    image = torch.randint(0, 4, (bsz,), generator=gen)
    if bsz > 1:
        image[1] = image[0]  # repeated image
    status = torch.randint(0, 3, (bsz, N), generator=gen)
    extra = torch.rand(bsz, N, n_extra, generator=gen) if n_extra else None
    q_ref = ref(pyg_batch(xs, graphs, image, status, extra)).view(bsz, N, out_per_node)
    q = net.forward_dense(dense, image, status, extra=extra)
    assert q.shape == (bsz, N, out_per_node)
    assert (q - q_ref).abs().max() <= 1e-5
    w = torch.randn(q.shape, generator=gen)
    (q_ref * w).sum().backward()
    (q * w).sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p_ref.grad is not None, name
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4), (
            name,
            (p.grad - p_ref.grad).abs().max(),
        )


@pytest.mark.parametrize("conv", ["transformer", "gatv2"])
def test_precompute_shared_and_network_is_relation_aware(conv: str) -> None:
    xs, graphs, dense, gen = pool(3, seed=5)
    net = DenseQNetwork(DS + 3, hidden=8, layers=2, heads=2, out_per_node=2, conv=conv)
    image, status = torch.tensor([2, 0, 2]), torch.randint(0, 3, (3, N), generator=gen)
    base = net.forward_dense(dense, image, status)
    net.state_chunk = 2  # chunks of states share `pre`; exact
    assert torch.allclose(net.forward_dense(dense, image, status), base, atol=1e-6)
    net.state_chunk = None
    pre = net.precompute(dense, torch.tensor([0, 2]))
    assert torch.equal(net.forward_dense(dense, image, status, pre=pre.detach()), base)
    with pytest.raises(ValueError, match="other images"):
        net.forward_dense(dense, torch.tensor([1]), status[:1], pre=pre)
    swapped = type(dense)(
        dense.x_static, dense.nbr[::-1], dense.attr[::-1], dense.valid[::-1], dense.row_node[::-1]
    )
    assert not torch.allclose(net.forward_dense(swapped, image, status), base, atol=1e-4)


def test_extra_inputs_are_required_exactly_when_the_network_has_them() -> None:
    xs, _, dense, gen = pool(2, seed=6)
    image, status = torch.tensor([0, 1]), torch.randint(0, 3, (2, N), generator=gen)
    with_extra = DenseQNetwork(DS + 6, hidden=8, layers=1, heads=2)
    plain = DenseQNetwork(DS + 3, hidden=8, layers=1, heads=2)
    with pytest.raises(ValueError, match="3 extra node inputs"):
        with_extra.forward_dense(dense, image, status)
    with pytest.raises(ValueError, match="3 extra node inputs"):
        with_extra.forward_dense(dense, image, status, extra=torch.rand(2, N, 2))
    with pytest.raises(ValueError, match="0 extra node inputs"):
        plain.forward_dense(dense, image, status, extra=torch.rand(2, N, 3))
    with pytest.raises(ValueError, match="more than in_dim - 3"):
        DenseQNetwork(DS + 2, hidden=8, layers=1, heads=2).forward_dense(dense, image, status)
    # the extra inputs change the Q-values (they are read, not dropped)
    e = torch.rand(2, N, 3, generator=gen)
    assert not torch.allclose(
        with_extra.forward_dense(dense, image, status, extra=e),
        with_extra.forward_dense(dense, image, status, extra=e + 1),
    )


def test_dense_masked_argmax_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        q = torch.randint(-2, 3, (4, 6), generator=gen).float()  # ties
        mask = torch.rand(4, 6, generator=gen) < 0.5
        mask[0] = False
        a, v = dense_masked_argmax(q, mask)
        ra, rv = masked_argmax(q.reshape(-1, 2), mask.reshape(-1, 2), torch.arange(4).repeat_interleave(3))
        assert torch.equal(a, ra) and torch.equal(v, rv)


# --------------------------------------------------------------------------------------------------
# On the environment (tiny random SAM, synthetic images)
# --------------------------------------------------------------------------------------------------

G = 8


env = _test_env.env  # the same tiny-env fixture and ideal states as tests/unit/test_env.py
_ideal = _test_env._ideal


def _nets(env: PromptEnv, out: int, seed: int = 0) -> tuple[QNetwork, DenseQNetwork]:
    c = env.features[0].dino_tokens.shape[-1]
    torch.manual_seed(seed)
    ref = QNetwork(c + 5, hidden=16, layers=2, heads=2, out_per_node=out)
    net = DenseQNetwork(c + 5, hidden=16, layers=2, heads=2, out_per_node=out)
    net.load_state_dict(ref.state_dict())
    return ref, net


def test_static_graphs_match_observe(env: PromptEnv) -> None:
    ids = torch.tensor([0, 3, 3, 1])
    status = torch.randint(0, 3, (4, G * G), generator=torch.Generator().manual_seed(2))
    obs = env.observe(ids, status)
    graphs = env.static_graphs()
    assert graphs is env.static_graphs()  # built once
    n = G * G
    assert torch.equal(graphs.x_static[ids].reshape(4 * n, -1), obs.x[:, :-3])
    for role in ("attack", "defend"):
        assert torch.equal(get_role(role).mask(status).reshape(4 * n, -1), role_mask(obs, role))
    ref, net = _nets(env, 2)
    q_ref = q_values(ref, obs).view(4, n, 2)
    assert (net.forward_dense(graphs, ids, status) - q_ref).abs().max() <= 1e-5


def _agents(env: PromptEnv, role: str, seed: int = 0, n_extra: int = 0) -> tuple[PygDQNAgent, DQNAgent]:
    """The PyG reference agent and the dense agent of a role, same weights (``n_extra`` extra node inputs)."""
    c = env.features[0].dino_tokens.shape[-1]
    out = get_role(role).outputs_per_node
    torch.manual_seed(seed)
    ref = QNetwork(c + 5 + n_extra, hidden=16, layers=2, heads=2, out_per_node=out)
    net = DenseQNetwork.from_qnetwork(ref)
    assert net is not ref and torch.equal(net.input.weight, ref.input.weight)
    return PygDQNAgent(role, ref, target=ref), DQNAgent(role, net, target=net)


def test_dense_final_status_equals_pyg_rollout_without_decoding(env: PromptEnv) -> None:
    ids = torch.tensor([0, 1, 2, 3])
    start = _ideal(env, [0, 1, 2, 3])
    budget = torch.tensor([1, 3, 5, 4])
    ref, agent = _agents(env, "attack", seed=4)
    want = rollout(env, ref, "attack", ids, start, budget).status  # PyG reference, every state decoded
    decodes = env.timings.calls["decode"]
    got = agent.final_status(agent.inputs(env), ids, start, budget)
    assert env.timings.calls["decode"] == decodes  # SAM never called
    assert torch.equal(got, want)
    assert ((got != 0).sum(1) - (start != 0).sum(1)).tolist() == budget.tolist()


@pytest.mark.parametrize("eps", [0.5, 1.0])
@pytest.mark.parametrize("random_policy", [False, True])
def test_epsilon_and_random_final_status_equal_rollout(
    env: PromptEnv, eps: float, random_policy: bool
) -> None:
    """The epsilon-greedy / random start states of the defence phase: same states as a decoded roll-out."""
    ids = torch.tensor([0, 1, 2, 3])
    start = _ideal(env, [0, 1, 2, 3])
    budget = torch.tensor([2, 3, 5, 4])
    ref, agent = _agents(env, "attack", seed=5)
    want = rollout(
        env,
        None if random_policy else ref,
        "attack",
        ids,
        start,
        budget,
        eps,
        torch.Generator().manual_seed(11),
    ).status
    got = agent.final_status(
        agent.inputs(env), ids, start, budget, eps, torch.Generator().manual_seed(11), random=random_policy
    )
    assert torch.equal(got, want)
    assert ((got != 0).sum(1) - (start != 0).sum(1)).tolist() == budget.tolist()


@pytest.mark.parametrize("sam_inputs", [False, True])
@pytest.mark.parametrize(("keep_last_positive", "min_q", "max_steps"), [(True, 0.0, None), (False, -0.05, 3)])
def test_greedy_defence_dense_agent_equals_pyg_reference(
    env: PromptEnv, sam_inputs: bool, keep_last_positive: bool, min_q: float, max_steps: int | None
) -> None:
    """THE defence loop on the dense agent (inference's Q path) stops on the same states, after the same
    steps and for the same reasons as on the PyG reference; its Q-values agree within 1e-5."""
    ids = torch.tensor([0, 1, 2, 3, 1])
    start = _ideal(env, [0, 1, 2, 3, 1])
    start[1, :5] = 2  # some negatives
    start[4] = 0
    start[4, 7] = 1  # a single positive: the last-positive rule
    ref, agent = _agents(env, "defend", seed=8, n_extra=3 if sam_inputs else 0)
    # shift the Q-values so that the best start value is above min_q for some episodes and not for others
    extra = env.sam_features(ids, start) if sam_inputs else None
    q0 = agent.q(agent.inputs(env), ids, start, extra=extra).masked_fill(start == 0, float("-inf"))
    shift = min_q - float(q0.max(1).values[:4].median()) + 1e-4
    with torch.no_grad():
        for a in (ref, agent):
            a.online.head[-1].bias.add_(shift)
    args = (ids, start, max_steps, keep_last_positive, sam_inputs, min_q)
    want = greedy_defence(env, ref, *args)
    got = greedy_defence(env, agent, *args)
    assert torch.equal(got.status, want.status) and torch.equal(got.steps, want.steps)
    assert got.stop_reason == want.stop_reason
    assert int(got.steps.sum()) > 0 and len(set(got.stop_reason)) > 1  # the case is not trivial
    for q, q_ref in zip(got.q_values, want.q_values, strict=True):
        assert len(q) == len(q_ref) and all(abs(a - b) <= 1e-5 for a, b in zip(q, q_ref, strict=True))
    # a bare Q-network is acted with as a dense agent: the same trace
    bare = greedy_defence(env, ref.online, *args)
    assert torch.equal(bare.status, got.status) and bare.q_values == got.q_values


def test_as_agent_checks_the_role_and_the_model(env: PromptEnv) -> None:
    ref, agent = _agents(env, "defend")
    assert as_agent(agent, "defend") is agent
    wrapped = as_agent(ref.online, "defend")
    assert type(wrapped) is DQNAgent and isinstance(wrapped.online, DenseQNetwork)
    assert wrapped.online is not ref.online and wrapped.target is wrapped.online
    with pytest.raises(ValueError, match="defend agent cannot act as the attack role"):
        as_agent(agent, "attack")
    with pytest.raises(TypeError, match="expected a DQNAgent or a QNetwork"):
        as_agent(torch.nn.Linear(2, 2), "defend")


@pytest.mark.parametrize("role", ["attack", "defend"])
@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_dense_td_loss_equals_reference(env: PromptEnv, role: str, double_dqn: bool, shared: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    s = 6
    status = torch.randint(0, 3, (s, G * G), generator=gen)
    status[0] = 0  # defender: no valid action at s'; attacker: all valid
    ids = torch.randint(0, 4, (s,), generator=gen)
    mask = get_role(role).mask(status)
    mask[0] = True
    action = torch.multinomial(mask.float(), 1, generator=gen).squeeze(1)
    sample = {
        "image_id": ids,
        "status": status.to(torch.int8),
        "action": action,
        "reward": torch.randn(s, generator=gen),
        "next_status": torch.randint(0, 3, (s, G * G), generator=gen).to(torch.int8),
        "done": torch.rand(s, generator=gen) < 0.3,
    }
    sample["next_status"][0] = 0
    out = 2 if role == "attack" else 1
    ref, net = _nets(env, out, seed=1)
    ref_t, net_t = _nets(env, out, seed=2)
    # reference: exactly PPDTask.td_step's PyG path
    obs = env.observe(sample["image_id"], sample["status"].long())
    nxt = env.observe(sample["image_id"], sample["next_status"].long())
    q = q_values(ref, obs)
    from ppd.models.qnet import gather_action_q

    q_sa = gather_action_q(q, obs.batch, sample["action"], obs.ptr)
    with torch.no_grad():
        m2 = role_mask(nxt, role)
        qt = q_values(ref_t, nxt)
        nv = (
            double_dqn_next_value(q_values(ref, nxt), qt, m2, nxt.batch)
            if double_dqn
            else dqn_next_value(qt, m2, nxt.batch)
        )
        tgt = td_target(sample["reward"], sample["done"], nv, 0.9)
    loss_ref = td_loss(q_sa, tgt)
    loss, q_mean = dense_td_loss(net, net_t, env.static_graphs(), sample, role, 0.9, double_dqn, True, shared)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 and abs(q_mean.item() - q_sa.mean().item()) <= 1e-5
    loss_ref.backward()
    loss.backward()
    for p, p_ref in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Fixed-seed short training: dense path vs PyG reference path end with the same networks
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny_ppd.yaml"


def _train(impl: str, steps: int) -> tuple[dict[str, torch.Tensor], object]:
    from ppd.fit import build_cli

    cli = build_cli(
        [
            "--config",
            str(TINY),
            f"--model.init_args.qnet_impl={impl}",
            "--model.init_args.heads=2",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
        ]
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}, cli


@pytest.mark.slow  # two short Lightning fits (~1 min on an idle 2-core CPU)
def test_short_training_dense_equals_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    steps = 14  # crosses attack -> defence phase switches (budgets 2-3, 2 parallel episodes)
    sd_ref, cli_ref = _train("pyg", steps)
    sd, cli = _train("dense", steps)
    task, task_ref = cli.model, cli_ref.model
    assert task.grad_steps == task_ref.grad_steps and task.grad_steps["defend"] > 0
    assert task.episode == task_ref.episode and task.env_steps == task_ref.env_steps
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        if k.endswith("lin_key.bias"):
            # q_i . b_k shifts all of node i's attention scores equally: softmax is invariant, so this
            # gradient is 0 in exact arithmetic and both paths feed Adam only rounding noise (which Adam
            # normalises to lr-sized steps in arbitrary directions). It has no effect on any Q-value.
            continue
        assert torch.allclose(sd[k], sd_ref[k], atol=1e-5, rtol=1e-4), k
    # the same buffers were written
    for role in ("attack", "defend"):
        a = cli.model.actor.buffers[role].state_dict()
        b = cli_ref.model.actor.buffers[role].state_dict()
        for k in ("image_id", "status", "action", "next_status", "done"):
            assert torch.equal(a[k], b[k]), (role, k)
        assert torch.allclose(a["reward"], b["reward"], atol=1e-6)
    # and the final Q-values agree on the training states
    env = cli.datamodule.env
    ids = torch.arange(len(env))
    status = cli.datamodule.ideal[ids]
    obs = env.observe(ids, status)
    for role, out in (("attack", 2), ("defend", 1)):
        net = task.qnet(role)
        ref = task_ref.qnet(role)
        q = net.forward_dense(env.static_graphs(), ids, status).reshape(-1, out)
        assert (q - q_values(ref, obs)).abs().max() <= 1e-4


@pytest.mark.parametrize("role", ["attack", "defend"])
def test_dense_and_pyg_agents_share_one_interface(env: PromptEnv, role: str) -> None:
    """Both agents hold the same parameters and give the same Q-values, actions and TD loss."""
    from ppd.rl.agent import build_agent

    c = env.features[0].dino_tokens.shape[-1]
    kw = dict(in_dim=c + 5, hidden=16, layers=2, heads=2, gamma=0.9)
    torch.manual_seed(0)
    dense = build_agent(role, "dense", **kw)
    pyg = build_agent(role, "pyg", **kw)
    pyg.load_state_dict(dense.state_dict())  # same state_dict layout
    ids = torch.tensor([0, 2, 1])
    status = torch.randint(0, 3, (3, G * G), generator=torch.Generator().manual_seed(5))
    q_d, q_p = dense.q(dense.inputs(env), ids, status), pyg.q(pyg.inputs(env), ids, status)
    assert q_d.shape == (3, G * G * get_role(role).outputs_per_node)
    assert (q_d - q_p).abs().max() <= 1e-5
    for eps in (0.0, 0.5, 1.0):  # one selection rule: the same draws on both Q paths
        a_d, _ = dense.select(dense.inputs(env), ids, status, eps, torch.Generator().manual_seed(3))
        a_p, _ = pyg.select(pyg.inputs(env), ids, status, eps, torch.Generator().manual_seed(3))
        assert torch.equal(a_d, a_p)
        assert bool(get_role(role).mask(status).gather(1, a_d[:, None]).all())  # valid actions
    sample = {
        "image_id": ids,
        "status": status.to(torch.int8),
        "action": a_d,
        "reward": torch.tensor([0.1, -0.2, 0.0]),
        "next_status": get_role(role).apply(status, a_d, torch.ones(3, dtype=torch.bool)).to(torch.int8),
        "done": torch.tensor([False, True, False]),
    }
    loss_d, qm_d = dense.td_loss(dense.inputs(env), sample)
    loss_p, qm_p = pyg.td_loss(pyg.inputs(env), sample)
    assert abs(float(loss_d) - float(loss_p)) <= 1e-5 and abs(float(qm_d) - float(qm_p)) <= 1e-5
    with torch.no_grad():
        dense.online.input.bias.add_(1.0)
    assert not torch.equal(
        dense.q(dense.inputs(env), ids, status, target=True), dense.q(dense.inputs(env), ids, status)
    )
    dense.sync()
    assert torch.equal(
        dense.q(dense.inputs(env), ids, status, target=True), dense.q(dense.inputs(env), ids, status)
    )
    with pytest.raises(ValueError, match="qnet_impl must be"):
        build_agent(role, "sparse", **kw)


@pytest.mark.parametrize("role", ["attack", "defend"])
def test_collect_step_stores_the_env_transition(env: PromptEnv, role: str) -> None:
    """One step: each live episode changes exactly one node as its action says; reward and done as the env's."""
    from ppd.rl.agent import collect_step
    from ppd.rl.replay import ReplayBuffer

    r = get_role(role)
    ids = torch.tensor([0, 1, 2])
    start = _ideal(env, [0, 1, 2])
    env.reset(ids, start, budget=torch.tensor([1, 2, 0]))  # episode 2 has no budget: it does not act
    dice0 = env.dice.clone()
    buf = ReplayBuffer(10, G * G)
    out = collect_step(env, None, role, buf, 0.0, torch.Generator().manual_seed(0))
    assert out.stored == 2 and len(buf) == 2
    s = buf.sample(2, torch.Generator().manual_seed(0))
    order = s["index"].argsort()
    s = {k: v[order] for k, v in s.items()}
    assert s["image_id"].tolist() == [0, 1]
    changed = s["status"].long() != s["next_status"].long()
    assert changed.sum(1).tolist() == [1, 1]
    assert torch.equal(changed.nonzero()[:, 1], s["action"] // r.outputs_per_node)
    assert torch.equal(s["next_status"].long(), env.status[:2])
    want = r.reward_sign * (env.dice_of(ids[:2], env.status[:2]) - dice0[:2])
    assert torch.allclose(s["reward"], want)
    assert s["done"].tolist() == [True, False]  # episode 0 used its budget of 1
    assert out.can_act  # episode 1 has budget left
    out = collect_step(env, None, role, buf, 0.0, torch.Generator().manual_seed(1))
    assert out.stored == 1 and not out.can_act
