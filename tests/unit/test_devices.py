"""The CUDA path, tested on every device this machine has: always CPU, plus ``cuda`` when available.

Parametrised (not skipped): without a GPU the ``cuda`` cases do not exist; ``experiments/gpu_check.sh`` runs
``pytest -k cuda`` on a GPU machine and fails when none was collected.
"""

from __future__ import annotations

import copy

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_on_device_matches_cpu(tiny_sam: torch.nn.Module, device: str) -> None:
    from ppd.models.sam import decode

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 256, 64, 64, generator=g).half()
    pts = torch.rand(3, 4, 2, generator=g) * 1024
    lab = torch.randint(0, 2, (3, 4), generator=g)
    ref, ref_iou = decode(tiny_sam, emb, pts, lab)
    sam = copy.deepcopy(tiny_sam).to(device)
    out, iou = decode(sam, emb, pts, lab)
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(iou.cpu(), ref_iou, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_env_rewards_with_sam_on_device(tiny_sam: torch.nn.Module, tiny_env_inputs, device: str) -> None:
    from ppd.env.prompt_env import PromptEnv

    feats, masks = tiny_env_inputs
    ref_env = PromptEnv(tiny_sam, feats, masks, grid=8, k_feature=4, k_physical=4, budget_range=(2, 3))
    env = PromptEnv(copy.deepcopy(tiny_sam).to(device), feats, masks, grid=8, k_feature=4, k_physical=4)
    ids = torch.arange(len(feats))
    status = torch.zeros(len(feats), 64, dtype=torch.long)
    status[:, 9] = 1
    status[:, 30] = 2
    logits = env.low_res_logits(ids, status)
    assert logits.device.type == "cpu"  # env state stays on the CPU
    torch.testing.assert_close(logits, ref_env.low_res_logits(ids, status), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(env.dice_of(ids, status), ref_env.dice_of(ids, status), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_qnet_trains_on_device(tiny_sam: torch.nn.Module, tiny_env_inputs, device: str) -> None:
    from ppd.env.prompt_env import PromptEnv
    from ppd.models.qnet import QNetwork

    feats, masks = tiny_env_inputs
    env = PromptEnv(tiny_sam, feats, masks, grid=8, k_feature=4, k_physical=4, budget_range=(2, 3))
    ids = torch.arange(len(feats))
    status = torch.zeros(len(feats), 64, dtype=torch.long)
    status[:, 9] = 1
    env.reset(ids, status, budget=torch.full((len(feats),), 3))
    obs = env.observe().to(device)
    torch.manual_seed(0)
    q = QNetwork(in_dim=obs.x.shape[1], hidden=16, layers=2, heads=1, out_per_node=2).to(device)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = q(obs)
        loss = (out - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out.device.type == device and out.shape == (obs.x.shape[0], 2)
    assert losses[-1] < losses[0]
