"""Real MobileSAM + DINOv2 on the bundled sample images: prompt quality, attacks, reward resolution.

Reference numbers (DESIGN.md, PH2 at full size): ideal 10+10 -> mDSC 0.838, dense grid -> 0.727,
one interior click -> 0.608. Random weights would give Dice ~0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.env.prompt_env import INACTIVE, NEGATIVE, POSITIVE, PromptEnv, dice_score
from ppd.env.prompts import ideal_prompts, mask_on_grid
from ppd.eval.methods.clicks import most_interior_point
from ppd.models.sam import build_sam, decode, to_input_frame, upscale_logits

pytestmark = pytest.mark.slow
G = 16


@pytest.fixture(scope="module")
def real():
    samples = [s for name in ("cvc_clinicdb", "ph2") for s in SegmentationFolder(f"examples/data/{name}")]
    cache = FeatureCache(sam_variant="vit_t", dino_name="dinov2_vits14", dino_resolution=224)
    feats = [cache.get(s.image) for s in samples]
    sam = build_sam("vit_t")
    env = PromptEnv(sam, feats, [s.mask for s in samples], grid=G, decode_chunk=4)
    return samples, feats, sam, env


def _full_dice(env: PromptEnv, samples, status: torch.Tensor) -> torch.Tensor:
    out = []
    for i, s in enumerate(samples):
        pred = env.full_resolution_mask(i, status[i])
        out.append(dice_score(pred[None], torch.as_tensor(s.mask)[None])[0])
    return torch.stack(out)


def _ideal(samples, max_pos, max_neg) -> torch.Tensor:
    return torch.stack(
        [
            ideal_prompts(s.mask, G, 1, max_pos, max_neg, generator=torch.Generator().manual_seed(i))
            for i, s in enumerate(samples)
        ]
    ).long()


def test_batched_decode_matches_sam_predictor(real) -> None:
    samples, feats, sam, _ = real
    s, f = samples[0], feats[0]
    pts = torch.tensor([[[100.0, 120.0], [200.0, 150.0], [20.0, 20.0]]])
    lab = torch.tensor([[1, 1, 0]])
    ours, iou = decode(sam, f.sam_embedding.float()[None], to_input_frame(pts, f.original_size), lab)
    pred = SamPredictor(sam)
    pred.set_image(s.image)
    _, ref_iou, ref_low = pred.predict(
        pts[0].numpy(), lab[0].numpy(), multimask_output=False, return_logits=True
    )
    # the cached embedding is fp16: logits agree to a small tolerance, masks almost everywhere
    assert np.mean((ours[0].numpy() > 0) == (ref_low > 0)) > 0.995
    assert abs(float(iou) - float(ref_iou[0])) < 0.02


def test_ideal_prompts_reach_reference_quality(real) -> None:
    samples, _, _, env = real
    capped = _full_dice(env, samples, _ideal(samples, 10, 10))
    dense = _full_dice(env, samples, _ideal(samples, None, None))
    print(
        f"\nideal 10+10: mDSC {capped.mean():.3f} over {len(samples)} images; dense grid: {dense.mean():.3f}"
    )
    assert capped.mean() >= 0.75
    assert dense.mean() < capped.mean() - 0.05  # the dense "ideal" grid is measurably worse


def test_low_res_reward_dice_tracks_full_resolution(real) -> None:
    samples, _, _, env = real
    st = _ideal(samples, 10, 10)
    low = env.dice_of(torch.arange(len(samples)), st)
    full = _full_dice(env, samples, st)
    mad = (low - full).abs().mean().item()
    print(f"\nlow-res vs full-res Dice on ideal prompts: mean |diff| {mad:.4f}")
    assert mad < 0.03


def test_wrong_label_prompts_lower_dice(real) -> None:
    samples, _, _, env = real
    start = _ideal(samples, 10, 10)
    attacked = start.clone()
    for i, s in enumerate(samples):
        inside = mask_on_grid(s.mask, G).reshape(-1)
        free = start[i] == INACTIVE
        g = torch.Generator().manual_seed(100 + i)
        neg_in = (free & inside).nonzero().squeeze(1)
        pos_out = (free & ~inside).nonzero().squeeze(1)
        neg_in = neg_in[torch.randperm(len(neg_in), generator=g)[:5]]
        pos_out = pos_out[torch.randperm(len(pos_out), generator=g)[: 10 - len(neg_in)]]
        attacked[i, neg_in] = NEGATIVE
        attacked[i, pos_out] = POSITIVE
    ids = torch.arange(len(samples))
    before, after = env.dice_of(ids, start), env.dice_of(ids, attacked)
    print(f"\n10 wrong-label prompts: mDSC {before.mean():.3f} -> {after.mean():.3f}")
    assert after.mean() < before.mean() - 0.1
    assert (after < before).float().mean() > 0.8


def test_one_interior_click(real) -> None:
    samples, feats, sam, _ = real
    single, best = [], []
    for s, f in zip(samples, feats, strict=True):
        x, y = most_interior_point(s.mask)
        pts = to_input_frame(torch.tensor([[[x, y]]]), f.original_size)
        gt = torch.as_tensor(s.mask)[None]
        for multi, out in ((False, single), (True, best)):
            low, iou = decode(
                sam, f.sam_embedding.float()[None], pts, torch.tensor([[1]]), multimask_output=multi
            )
            k = int(iou[0].argmax())
            pred = upscale_logits(low[:, k : k + 1], f.input_size, f.original_size)[0, 0] > 0
            out.append(float(dice_score(pred[None], gt)[0]))
    print(f"\none click: single-mask output mDSC {np.mean(single):.3f}, best-of-3 by IoU {np.mean(best):.3f}")
    assert np.mean(single) > 0.4 and np.mean(best) > 0.3
