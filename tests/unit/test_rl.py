"""Tests of ppd.rl: TD losses, replay buffer, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ppd.rl import (
    LinearSchedule,
    ReplayBuffer,
    double_dqn_next_value,
    dqn_next_value,
    td_loss,
    td_target,
)

INF = float("inf")


def test_td_target_hand_computed() -> None:
    reward = torch.tensor([1.0, -0.5, 0.25, 2.0])
    done = torch.tensor([False, True, False, False])
    next_q = torch.tensor([2.0, 3.0, -INF, -1.0])
    # 1 + 0.9 * 2 = 2.8 ; done -> -0.5 ; no valid next action -> 0.25 ; 2 + 0.9 * (-1) = 1.1
    expected = torch.tensor([2.8, -0.5, 0.25, 1.1])
    out = td_target(reward, done, next_q, gamma=0.9)
    assert torch.allclose(out, expected)
    assert torch.isfinite(out).all()
    assert torch.allclose(td_target(reward, done, next_q, gamma=0.0), reward)
    with pytest.raises(ValueError, match="gamma"):
        td_target(reward, done, next_q, gamma=1.5)
    with pytest.raises(ValueError, match="shape"):
        td_target(reward, done[:2], next_q, gamma=0.9)


def _double_dqn_example() -> tuple[torch.Tensor, ...]:
    # Graph 0: nodes 0-1, graph 1: nodes 2-4, graph 2: node 5 (nothing valid). K = 2.
    q_online = torch.tensor([[1.0, 5.0], [3.0, 2.0], [0.0, 0.5], [-1.0, 7.0], [2.0, 2.0], [9.0, 9.0]])
    q_target = torch.tensor(
        [[10.0, 20.0], [30.0, 40.0], [-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0], [1.0, 1.0]]
    )
    mask = torch.tensor([[1, 0], [1, 1], [1, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    batch = torch.tensor([0, 0, 1, 1, 1, 2])
    return q_online, q_target, mask, batch


def test_double_dqn_next_value_by_hand() -> None:
    q_online, q_target, mask, batch = _double_dqn_example()
    # Graph 0: valid online values {(0,0): 1, (1,0): 3, (1,1): 2} -> select node 1, k 0 -> target 30.
    # Graph 1: valid online values {(0,0): 0, (0,1): 0.5, (2,0): 2} -> select local node 2, k 0 -> -5.
    # Graph 2: nothing valid -> -inf.
    assert double_dqn_next_value(q_online, q_target, mask, batch).tolist() == [30.0, -5.0, -INF]
    # Vanilla DQN takes the max of the target net over valid actions: 40, -1, -inf.
    assert dqn_next_value(q_target, mask, batch).tolist() == [40.0, -1.0, -INF]
    # Trailing graph without nodes.
    assert double_dqn_next_value(q_online, q_target, mask, batch, num_graphs=4)[3] == -INF


def test_double_dqn_next_value_no_grad_and_k1() -> None:
    q_online = torch.tensor([[0.0], [2.0], [1.0]], requires_grad=True)
    q_target = torch.tensor([[5.0], [6.0], [7.0]], requires_grad=True)
    mask = torch.tensor([[True], [True], [True]])
    out = double_dqn_next_value(q_online, q_target, mask, torch.tensor([0, 0, 1]))
    assert out.tolist() == [6.0, 7.0] and not out.requires_grad


def test_huber_vs_mse() -> None:
    q = torch.zeros(3, requires_grad=True)
    target = torch.tensor([0.5, 2.0, -3.0])
    # MSE: (0.25 + 4 + 9) / 3
    assert math.isclose(td_loss(q, target, huber=False).item(), 13.25 / 3, rel_tol=1e-6)
    # Huber, delta 1: 0.5 * 0.25 + (2 - 0.5) + (3 - 0.5) = 4.125 -> / 3
    assert math.isclose(td_loss(q, target).item(), 4.125 / 3, rel_tol=1e-6)
    # Huber, delta 2: 0.125 + 0.5 * 4 + 2 * (3 - 1) = 6.125 -> / 3
    assert math.isclose(td_loss(q, target, delta=2.0).item(), 6.125 / 3, rel_tol=1e-6)
    td_loss(q, target).backward()
    # Huber gradient is clipped at delta: d/dq = -clip(target - q, -1, 1) / 3
    assert torch.allclose(q.grad, torch.tensor([-0.5, -1.0, 1.0]) / 3)


def _transitions(start: int, b: int, n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + b)
    return {
        "image_id": ids,
        "status": (ids[:, None] + torch.arange(n)) % 3,
        "action": ids * 10,
        "reward": ids.float() / 2,
        "next_status": (ids[:, None] + torch.arange(n) + 1) % 3,
        "done": ids % 2 == 0,
    }


def test_buffer_ring_overwrite() -> None:
    buf = ReplayBuffer(capacity=5, num_nodes=4)
    buf.add_batch(**_transitions(0, 3, 4))
    assert len(buf) == 3 and buf.position == 3
    buf.add_batch(**_transitions(3, 4, 4))  # ids 3, 4 -> slots 3, 4; ids 5, 6 -> slots 0, 1
    assert len(buf) == 5 and buf.position == 2
    state = buf.state_dict()
    assert state["image_id"].tolist() == [5, 6, 2, 3, 4]
    assert state["action"].tolist() == [50, 60, 20, 30, 40]
    assert state["status"].dtype == torch.int8 and state["done"].dtype == torch.bool
    assert torch.equal(state["next_status"][0], ((5 + torch.arange(4) + 1) % 3).to(torch.int8))
    # More than capacity at once: only the last 5 survive, in ring order continuing from position 2.
    buf.add_batch(**_transitions(100, 7, 4))
    assert len(buf) == 5
    assert sorted(buf.state_dict()["image_id"].tolist()) == [102, 103, 104, 105, 106]
    buf.add(7, torch.zeros(4, dtype=torch.long), 3, 1.0, torch.ones(4, dtype=torch.long), True)
    with pytest.raises(ValueError, match="integer"):
        buf.add(7, torch.zeros(4), 3, 1.0, torch.ones(4), True)
    assert len(buf) == 5


def test_buffer_rejects_bad_shapes() -> None:
    buf = ReplayBuffer(capacity=5, num_nodes=4)
    bad = _transitions(0, 3, 4)
    bad["status"] = bad["status"][:, :3]
    with pytest.raises(ValueError, match="'status'"):
        buf.add_batch(**bad)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)


def test_buffer_samples_only_filled_slots_uniformly() -> None:
    buf = ReplayBuffer(capacity=100, num_nodes=3)
    buf.add_batch(**_transitions(0, 10, 3))
    gen = torch.Generator().manual_seed(0)
    s = buf.sample(20_000, gen)
    assert s["index"].max() < 10
    assert set(s["image_id"].tolist()) <= set(range(10))
    assert torch.equal(s["action"], s["image_id"] * 10)  # fields stay aligned
    assert s["status"].shape == (20_000, 3) and s["reward"].dtype == torch.float32
    counts = torch.bincount(s["image_id"], minlength=10)
    assert ((counts - 2000).abs() < 200).all(), counts.tolist()


def test_buffer_state_dict_round_trip(tmp_path: Path) -> None:
    buf = ReplayBuffer(capacity=6, num_nodes=4)
    buf.add_batch(**_transitions(0, 8, 4))  # wrapped: size 6, position 2
    path = tmp_path / "buffer.pt"
    torch.save(buf.state_dict(), path)
    restored = ReplayBuffer(capacity=6, num_nodes=4)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert len(restored) == 6 and restored.position == 2
    a = buf.sample(50, torch.Generator().manual_seed(3))
    b = restored.sample(50, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Both continue writing at the same slot.
    buf.add_batch(**_transitions(50, 1, 4))
    restored.add_batch(**_transitions(50, 1, 4))
    assert torch.equal(buf.state_dict()["image_id"], restored.state_dict()["image_id"])
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=7, num_nodes=4).load_state_dict(buf.state_dict())
    # A partially filled buffer round-trips too.
    small = ReplayBuffer(capacity=6, num_nodes=4)
    small.add_batch(**_transitions(0, 2, 4))
    other = ReplayBuffer(capacity=6, num_nodes=4)
    other.load_state_dict(small.state_dict())
    assert len(other) == 2 and other.state_dict()["image_id"].tolist() == [0, 1]


def test_linear_schedule_endpoints() -> None:
    sched = LinearSchedule(1.0, 0.1, steps=100)
    assert sched.value(0) == 1.0
    assert math.isclose(sched.value(50), 0.55)
    assert math.isclose(sched.value(100), 0.1)
    assert sched.value(10_000) == 0.1 and sched(10_000) == 0.1
    assert sched.value(-5) == 1.0
    assert LinearSchedule(1.0, 0.1, steps=0).value(0) == 0.1
    values = [sched.value(s) for s in range(101)]
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="steps"):
        LinearSchedule(steps=-1)
