"""PromptDefender: stopping rule (stub Q-network), click snapping, result assembly, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ppd.env.prompts import NEGATIVE, POSITIVE
from ppd.env.roles import get_role
from ppd.inference import PromptDefender, greedy_defence, mask_dice_iou
from ppd.rl.agent import DQNAgent
from tests.helpers.defender import TINY_ENV, FakeFeatureCache, box_decode, oracle_decode, write_tiny_defender
from tests.helpers.synthetic import synthetic_pair

G = 8
N = G * G


class StubQ(DQNAgent):
    """Agent whose Q-values are a fixed table ``(N * K,)`` in the flat action layout (independent of the
    state); selection, masks and the stopping rule are the real ones (:meth:`DQNAgent.select`)."""

    def __init__(self, q: torch.Tensor, role: str = "defend") -> None:
        super().__init__(role, nn.Linear(1, get_role(role).outputs_per_node))
        self.table = q.float().reshape(1, -1)

    def inputs(self, env):  # noqa: ANN001, ANN201
        return env

    def q(self, inputs, image_ids, status, target=False, extra=None):  # noqa: ANN001, ANN201
        return self.table.expand(len(image_ids), -1)


@pytest.fixture
def env(tiny_sam, tiny_env_inputs):
    from ppd.env.prompt_env import PromptEnv

    feats, masks = tiny_env_inputs
    return PromptEnv(tiny_sam, feats, masks, grid=G, k_feature=4, k_physical=4)


def _start(active: dict[int, int]) -> torch.Tensor:
    s = torch.zeros(N, dtype=torch.long)
    for node, st in active.items():
        s[node] = st
    return s


def test_stops_when_best_q_not_positive(env) -> None:
    q = torch.full((N,), -5.0)
    q[[0, 1, 3, 5]] = torch.tensor([3.0, 2.0, -1.0, 0.0])
    start = _start({0: POSITIVE, 1: NEGATIVE, 3: POSITIVE, 5: NEGATIVE})
    tr = greedy_defence(env, StubQ(q), [0], start[None])
    assert tr.steps.tolist() == [2]
    assert tr.q_values[0] == pytest.approx([3.0, 2.0, 0.0])  # a best Q of exactly 0 stops
    assert tr.stop_reason == ["q<=0"]
    assert tr.status[0].nonzero().squeeze(1).tolist() == [3, 5]
    assert tr.status[0, 3] == POSITIVE and tr.status[0, 5] == NEGATIVE


def test_respects_budget_and_exhaustion(env) -> None:
    q = torch.linspace(1, 2, N)  # every node positive: only the budget / prompt count stops it
    start = _start({2: POSITIVE, 9: NEGATIVE, 40: POSITIVE})
    tr = greedy_defence(env, StubQ(q), [0, 1], torch.stack([start, start]), max_steps=2)
    assert tr.steps.tolist() == [2, 2] and tr.stop_reason == ["budget", "budget"]
    assert tr.status[0].nonzero().squeeze(1).tolist() == [2]  # highest-Q nodes (40, then 9) removed first
    tr = greedy_defence(env, StubQ(q), [0], start[None], max_steps=None, keep_last_positive=False)
    assert tr.steps.tolist() == [3] and tr.stop_reason == ["no_active_prompt"]
    tr = greedy_defence(env, StubQ(q), [0], start[None], max_steps=None)  # default: keep one positive
    assert tr.steps.tolist() == [2] and tr.stop_reason == ["last_positive"]
    assert tr.status[0].nonzero().squeeze(1).tolist() == [2]
    tr = greedy_defence(env, StubQ(q), [0], start[None], max_steps=0)
    assert tr.steps.tolist() == [0] and tr.q_values == [[]]


def test_batched_episodes_stop_independently(env) -> None:
    q = torch.full((N,), -1.0)
    q[7] = 4.0
    a = _start({7: POSITIVE, 8: POSITIVE})
    b = _start({8: POSITIVE})
    tr = greedy_defence(env, StubQ(q), [2, 3], torch.stack([a, b]), keep_last_positive=False)
    assert tr.steps.tolist() == [1, 0]
    assert tr.q_values == [[4.0, -1.0], [-1.0]]


def test_last_positive_is_protected_but_negatives_are_not(env) -> None:
    q = torch.full((N,), -1.0)
    q[[7, 8, 9]] = torch.tensor([5.0, 4.0, 3.0])  # the defender wants every prompt gone
    start = _start({7: POSITIVE, 8: NEGATIVE, 9: NEGATIVE})
    tr = greedy_defence(env, StubQ(q), [0], start[None])
    # the lone positive (7) is not removable: the two negatives go (best first), then nothing is left to do
    assert tr.steps.tolist() == [2] and tr.stop_reason == ["last_positive"]
    assert tr.q_values == [[4.0, 3.0]]
    assert tr.status[0].nonzero().squeeze(1).tolist() == [7]


def _defender(
    tiny_sam, q: torch.Tensor | None = None, max_steps: int | None = None, keep_last_positive: bool = True
) -> PromptDefender:
    from ppd.models.qnet import QNetwork

    qnet = StubQ(q) if q is not None else QNetwork(in_dim=53, hidden=16, layers=1, heads=2)
    return PromptDefender(
        qnet,
        dict(TINY_ENV),
        tiny_sam,
        FakeFeatureCache(),
        max_steps=max_steps,
        keep_last_positive=keep_last_positive,
    )


def test_refine_snaps_clicks_and_reports(tiny_sam, monkeypatch) -> None:
    monkeypatch.setattr("ppd.env.decoders.decode", oracle_decode)
    image, gt = synthetic_pair(5)  # 64 x 48
    q = torch.full((N,), -1.0)
    q[0] = 1.0  # node 0 (top-left) is the only one the defender wants to remove
    d = _defender(tiny_sam, q)
    # clicks: top-left node twice (last label wins: negative), a positive at node (row 3, col 4)
    pts = [[1.0, 1.0], [2.0, 2.0], [4.5 * 64 / 8, 3.5 * 48 / 8]]
    r = d.refine(image, pts, [1, 0, 1], gt_mask=gt)
    assert r.removed.tolist() == [[4.0, 3.0]] and r.removed_labels.tolist() == [0]
    assert r.points.tolist() == [[36.0, 21.0]] and r.labels.tolist() == [1]
    # one positive is left: it is protected, so the loop ends without asking the network again
    assert r.steps == 1 and r.stop_reason == "last_positive" and r.q_values == pytest.approx([1.0])
    assert r.mask.shape == gt.shape and r.mask.all()  # oracle: any positive -> full mask
    assert r.dice_if_gt == pytest.approx(2 * gt.sum() / (gt.sum() + gt.size), abs=1e-6)
    assert int(r.start_status[0]) == NEGATIVE and int(r.status[0]) == 0


def test_no_active_prompt_gives_empty_mask(tiny_sam) -> None:
    image, gt = synthetic_pair(6)
    kept = _defender(tiny_sam, torch.ones(N)).refine(image, [[10.0, 10.0]], [1], gt_mask=gt)
    assert kept.steps == 0 and kept.stop_reason == "last_positive" and kept.points.shape == (1, 2)
    d = _defender(tiny_sam, torch.ones(N), keep_last_positive=False)
    r = d.refine(image, [[10.0, 10.0]], [1], gt_mask=gt)
    assert r.steps == 1 and r.points.shape == (0, 2) and not r.mask.any() and r.dice_if_gt == 0.0
    with pytest.raises(ValueError, match="outside the image"):
        d.refine(image, [[100.0, 10.0]], [1])
    with pytest.raises(ValueError, match="status must be"):
        d.refine_status(d.features(image), torch.zeros(5, dtype=torch.long))


def test_from_checkpoint_exported_file(tmp_path: Path, tiny_sam) -> None:
    path = write_tiny_defender(tmp_path / "defender.pt", max_steps=3)
    d = PromptDefender.from_checkpoint(path, sam=tiny_sam, cache=FakeFeatureCache())
    assert d.grid == 8 and d.max_steps == 3
    assert (
        PromptDefender.from_checkpoint(path, sam=tiny_sam, cache=FakeFeatureCache(), max_steps=1).max_steps
        == 1
    )
    assert d.keep_last_positive
    kw = dict(sam=tiny_sam, cache=FakeFeatureCache(), keep_last_positive=False)
    assert not PromptDefender.from_checkpoint(path, **kw).keep_last_positive
    bad = FakeFeatureCache()
    bad.config.dino_resolution = 224
    with pytest.raises(ValueError, match="trained with encoders"):
        PromptDefender.from_checkpoint(path, sam=tiny_sam, cache=bad)


def test_mask_dice_iou_hand_computed() -> None:
    pred = np.zeros((4, 5), bool)
    gt = np.zeros((4, 5), bool)
    pred[0, :3] = True  # 3 px
    gt[0, 1:5] = True  # 4 px, overlap 2
    d, j = mask_dice_iou(pred, gt)
    assert d == pytest.approx(2 * 2 / 7) and j == pytest.approx(2 / 5)
    assert mask_dice_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == (1.0, 1.0)
    assert mask_dice_iou(np.ones((3, 3), bool), np.zeros((3, 3), bool)) == (0.0, 0.0)


def test_validation_and_inference_share_one_defence_loop(tiny_sam, tiny_env_inputs, monkeypatch) -> None:
    """PPDTask's validation and PromptDefender stop on the same state after the same number of steps."""
    from types import SimpleNamespace

    from ppd.env.prompt_env import PromptEnv
    from ppd.rl.rollout import rollout
    from ppd.tasks.ppd import PPDTask

    monkeypatch.setattr("ppd.env.decoders.decode", box_decode)
    feats, masks = tiny_env_inputs
    env = PromptEnv(tiny_sam, feats, masks, grid=G, k_feature=4, k_physical=4)
    g = torch.Generator().manual_seed(0)
    ideal = torch.stack(
        [_start({int(n): POSITIVE for n in torch.randperm(N, generator=g)[:2]}) for _ in feats]
    )
    task = PPDTask(feature_dim=53, hidden=8, layers=1, heads=1, val_attack_steps=4, val_defend_steps=6)
    task.agents = {
        "attack": StubQ(torch.randn(2 * N, generator=g), "attack"),  # two Q-values per node (pos. / neg.)
        "defend": StubQ(torch.randn(N, generator=g) + 1.0),  # mostly positive: several stopping rules
    }
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(val_env=env, val_ideal=ideal))
    logged: dict[str, float] = {}
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    defender = PromptDefender(
        task.agents["defend"], dict(TINY_ENV), tiny_sam, FakeFeatureCache(), max_steps=6
    )
    reasons = set()
    for i in range(len(feats)):
        ids = torch.tensor([i])
        task.validation_step(ids, i)
        attacked = rollout(env, task.agents["attack"], "attack", ids, ideal[ids], 4).status[0]
        r = defender.refine_status(feats[i], attacked)
        reasons.add(r.stop_reason)
        assert logged["val/defender_actions"] == r.steps
        assert logged["val/defended_dice"] == pytest.approx(float(env.dice_of(ids, r.status[None])[0]))
        assert logged["val/defense_gain"] == pytest.approx(
            float(env.dice_of(ids, r.status[None])[0] - env.dice_of(ids, attacked[None])[0])
        )
    assert len(reasons) >= 2, reasons  # the images exercise more than one stopping rule
