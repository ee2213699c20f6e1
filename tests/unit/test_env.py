"""PromptEnv: rewards, masks, corner cases, observations, determinism (tiny random SAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_f1_score

from ppd.env.prompt_env import INACTIVE, NEGATIVE, POSITIVE, PromptEnv, dice_score
from ppd.env.prompts import ideal_prompts
from ppd.env.roles import ATTACK, DEFEND, get_role, wrong_labels

G = 8


@pytest.fixture()
def env(tiny_sam, tiny_env_inputs) -> PromptEnv:
    feats, masks = tiny_env_inputs
    return PromptEnv(tiny_sam, feats, masks, grid=G, k_feature=4, k_physical=4, budget_range=(3, 5))


def _ideal(env: PromptEnv, ids: list[int]) -> torch.Tensor:
    return torch.stack(
        [ideal_prompts(env.masks[i], G, 1, 3, 3, generator=torch.Generator().manual_seed(i)) for i in ids]
    ).long()


def test_dice_score_matches_torchmetrics_and_corner_cases() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 16, 16, generator=g) > 0.5
    gt = torch.rand(5, 16, 16, generator=g) > 0.4
    ours = dice_score(pred, gt)
    ref = torch.stack(
        [binary_f1_score(p.flatten().long(), t.flatten().long()) for p, t in zip(pred, gt, strict=True)]
    )
    assert torch.allclose(ours, ref, atol=1e-6)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert dice_score(empty, empty).item() == 1.0  # empty GT + empty prediction
    assert dice_score(empty, full).item() == 0.0
    assert dice_score(full, empty).item() == 0.0


def test_no_active_prompt_gives_empty_prediction(env: PromptEnv) -> None:
    status = torch.zeros(2, G * G, dtype=torch.long)
    logits = env.low_res_logits(torch.tensor([0, 1]), status)
    assert torch.isneginf(logits).all()
    assert env.dice_of(torch.tensor([0, 1]), status).tolist() == [0.0, 0.0]  # non-empty GT


def test_empty_gt_and_no_prompt_gives_dice_one(tiny_sam, tiny_env_inputs) -> None:
    feats, masks = tiny_env_inputs
    env = PromptEnv(tiny_sam, feats[:1], [np.zeros_like(masks[0])], grid=G)
    assert env.dice_of(torch.tensor([0]), torch.zeros(1, G * G, dtype=torch.long)).item() == 1.0


def test_reward_signs_are_dice_changes(env: PromptEnv) -> None:
    ids = torch.tensor([0, 1, 2])
    start = _ideal(env, [0, 1, 2])
    d0 = env.reset(ids, start, budget=torch.tensor([5, 5, 5]))
    free = [int((start[i] == INACTIVE).nonzero()[0]) for i in range(3)]
    res = env.step_attack(torch.tensor([2 * free[0], 2 * free[1] + 1, 2 * free[2]]))
    assert torch.allclose(res.reward, -(res.dice - d0))
    assert env.status[0, free[0]] == POSITIVE and env.status[1, free[1]] == NEGATIVE
    # the Dice after the step is what SAM gives for the new state
    assert torch.allclose(res.dice, env.dice_of(ids, env.status))
    d1 = res.dice
    res = env.step_defend(torch.tensor(free))
    assert torch.allclose(res.reward, res.dice - d1)
    assert torch.equal(env.status, start)
    assert torch.allclose(res.dice, d0, atol=1e-6)


def test_invalid_actions_raise_and_masks_forbid_them(env: PromptEnv) -> None:
    ids = torch.tensor([0])
    start = _ideal(env, [0])
    env.reset(ids, start, budget=torch.tensor([5]))
    active_node = int((start[0] != INACTIVE).nonzero()[0])
    inactive_node = int((start[0] == INACTIVE).nonzero()[0])
    am, dm = ATTACK.node_mask(env.status), DEFEND.node_mask(env.status).squeeze(-1)
    assert not am[0, active_node].any() and am[0, inactive_node].all()
    assert dm[0, active_node] and not dm[0, inactive_node]
    with pytest.raises(ValueError, match="invalid attacker action"):
        env.step_attack(torch.tensor([2 * active_node]))
    with pytest.raises(ValueError, match="invalid defender action"):
        env.step_defend(torch.tensor([inactive_node]))
    with pytest.raises(ValueError, match="invalid attacker action"):
        env.step_attack(torch.tensor([2 * G * G]))


def test_all_nodes_active_leaves_attacker_no_action(env: PromptEnv) -> None:
    status = torch.full((1, G * G), POSITIVE, dtype=torch.long)
    assert not ATTACK.mask(status).any()
    assert DEFEND.mask(status).all()
    env.reset(torch.tensor([0]), status, budget=torch.tensor([3]))
    assert 0.0 <= env.dice.item() <= 1.0


def test_budget_ends_episode_and_inactive_episodes_do_not_move(env: PromptEnv) -> None:
    ids = torch.tensor([0, 1])
    start = _ideal(env, [0, 1])
    env.reset(ids, start, budget=torch.tensor([1, 2]))
    free = [int((start[i] == INACTIVE).nonzero()[0]) for i in range(2)]
    res = env.step_attack(torch.tensor([2 * free[0], 2 * free[1]]))
    assert res.done.tolist() == [True, False]
    before = env.status.clone()
    free2 = int((env.status[1] == INACTIVE).nonzero()[0])
    res = env.step_attack(torch.tensor([0, 2 * free2]))  # episode 0 is done: its action is ignored
    assert torch.equal(env.status[0], before[0]) and res.reward[0] == 0
    assert res.done.all()


def test_observation_layout(env: PromptEnv) -> None:
    ids = torch.tensor([0, 3])
    start = _ideal(env, [0, 3])
    obs = env.observe(ids, start)
    n = G * G
    c = env.features[0].dino_tokens.shape[-1]
    assert obs.num_graphs == 2 and obs.x.shape == (2 * n, c + 5)
    assert torch.equal(obs.x[:n, -3:].argmax(1), start[0])
    assert set(obs.edge_type.unique().tolist()) == {0, 1}
    assert obs.edge_attr.shape == (obs.edge_index.shape[1], 1)
    assert obs.attack_mask.shape == (2 * n, 2) and obs.defend_mask.shape == (2 * n,)
    assert torch.equal(obs.defend_mask[:n], start[0] != INACTIVE)


def test_deterministic_budgets_and_steps(tiny_sam, tiny_env_inputs) -> None:
    feats, masks = tiny_env_inputs
    out = []
    for _ in range(2):
        env = PromptEnv(tiny_sam, feats, masks, grid=G, budget_range=(2, 9))
        b = env.sample_budgets(6, torch.Generator().manual_seed(4))
        start = _ideal(env, [0, 1])
        env.reset(torch.tensor([0, 1]), start, budget=b[:2])
        free = [int((start[i] == INACTIVE).nonzero()[-1]) for i in range(2)]
        out.append((b, env.step_attack(torch.tensor([2 * free[0], 2 * free[1] + 1])).dice))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][0].min() >= 2 and out[0][0].max() <= 9


def test_logits_do_not_depend_on_batch_composition(tiny_sam, tiny_env_inputs) -> None:
    """A state's logits (hence its reward) are the same alone or batched with states of other sizes."""
    feats, masks = tiny_env_inputs
    env = PromptEnv(tiny_sam, feats, masks, grid=G, decode_chunk=4)
    status = torch.zeros(4, G * G, dtype=torch.long)
    status[0, [1, 2]] = POSITIVE
    status[1, [3, 9, 20, 40, 41]] = NEGATIVE
    status[1, 30] = POSITIVE
    status[2, [5, 6]] = POSITIVE  # same count as row 0: shares its decoder call
    status[3, 50] = POSITIVE
    ids = torch.tensor([0, 1, 2, 0])
    batched = env.low_res_logits(ids, status)
    for i in range(4):
        alone = env.low_res_logits(ids[i : i + 1], status[i : i + 1])
        assert torch.allclose(batched[i], alone[0], atol=1e-5), i


def test_roles_masks_steps_and_wrong_labels() -> None:
    status = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    # attacker: both labels of inactive nodes; defender: active nodes (flat layout node * K + k)
    assert ATTACK.mask(status).tolist() == [
        [True, True, False, False, False, False, True, True],
        [False, False, False, False, True, True, False, False],
    ]
    assert DEFEND.mask(status).tolist() == [[False, True, True, False], [True, True, False, True]]
    live = torch.tensor([True, True])
    new = ATTACK.apply(status, torch.tensor([1, 4]), live)  # node 0 negative; node 2 positive
    assert new.tolist() == [[NEGATIVE, 1, 2, 0], [1, 1, POSITIVE, 2]]
    new = DEFEND.apply(status, torch.tensor([2, 3]), torch.tensor([True, False]))  # row 1 does not act
    assert new.tolist() == [[0, 1, INACTIVE, 0], [1, 1, 0, 2]]
    with pytest.raises(ValueError, match="invalid defender action 0"):
        DEFEND.apply(status, torch.tensor([0, 0]), live)
    assert get_role("defend") is DEFEND and get_role(ATTACK) is ATTACK
    with pytest.raises(ValueError, match="role must be one of"):
        get_role("heal")
    fg = torch.tensor([[True, False, True, False], [True, False, False, False]])
    # positive outside the object or negative inside; inactive nodes are never wrong
    assert wrong_labels(status, fg).tolist() == [[False, True, True, False], [False, True, False, False]]


def test_env_judges_with_an_injected_decoder(tiny_sam, tiny_env_inputs) -> None:
    """PromptEnv takes any object of the decoder protocol; raw embeddings unless it asks for the image side."""
    from ppd.env.decoders import TorchDecoder, build_decoder

    feats, masks = tiny_env_inputs
    calls: list[tuple[int, int]] = []

    class Everything:  # predicts the whole padded frame as foreground
        cached = False

        def decode(self, image, points, labels):
            calls.append((image.shape[0], points.shape[1]))
            return torch.full((points.shape[0], 1, 256, 256), 5.0), torch.ones(points.shape[0], 1)

    env = PromptEnv(tiny_sam, feats, masks, grid=G, decoder=Everything())
    status = _ideal(env, [0, 1])
    logits = env.low_res_logits(torch.tensor([0, 1]), status)
    assert torch.equal(logits, torch.full((2, 256, 256), 5.0))
    # one call per group of states with the same number of active prompts (decode_chunk 1: one per state)
    assert sorted(calls) == sorted((1, int((s != 0).sum())) for s in status)
    ref = PromptEnv(tiny_sam, feats, masks, grid=G)
    assert isinstance(ref.decoder, TorchDecoder) and not ref.decoder.cached
    assert build_decoder(tiny_sam, "torch_cached").cached
    with pytest.raises(ValueError, match="decoder_backend must be one of"):
        PromptEnv(tiny_sam, feats, masks, grid=G, decoder_backend="tpu")
