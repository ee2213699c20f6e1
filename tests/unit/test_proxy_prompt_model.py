"""Proxy Prompt Generator blocks: shapes (K = 1/4, 1/2 objects), selective map, SAM decoder hook-up, gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from ppd.models.proxy_prompt import (
    CBAM,
    BridgeUnit,
    ContextualColorization,
    ContextualEncoder,
    ProxyPromptConfig,
    ProxyPromptGenerator,
    ResBlock,
    decode_sparse,
    generate_and_decode,
    no_mask_dense,
    selective_map,
)

#: small generator for fast tests (same code path as the default one)
SMALL = dict(dim=32, grid=8, mask_dim=8, num_tokens=3, depth=4, heads=2)


def _inputs(b: int, k: int, o: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, 256, 64, 64, generator=g)
    support = torch.randn(b, k, 256, 64, 64, generator=g)
    masks = torch.rand(b, k, o, 256, 256, generator=g) > 0.7
    return target, support, masks


def test_cbam_and_resblock_shapes() -> None:
    x = torch.randn(3, 40, 8, 8)
    assert CBAM(40)(x).shape == (3, 40, 8, 8)
    assert ResBlock(40, 32)(x).shape == (3, 32, 8, 8)
    assert ResBlock(32, 32)(torch.randn(2, 32, 5, 5)).shape == (2, 32, 5, 5)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("o", [1, 2])
def test_shapes_through_every_block(k: int, o: int) -> None:
    cfg = ProxyPromptConfig(**SMALL)
    b, g, c = 2, cfg.grid, cfg.dim
    target, support, masks = _inputs(b, k, o)
    gen = ProxyPromptGenerator(cfg)
    # 1. contextual encoder: every support image + its union mask -> (B*K, C, g, g)
    feat = gen.encoder(support.flatten(0, 1), masks.float().amax(2).flatten(0, 1))
    assert feat.shape == (b * k, c, g, g)
    # 2. bridge unit: duplicated per object, CBAM + 2 ResBlocks, flattened -> (B*K, O, g*g, C)
    grid_masks = torch.rand(b * k, o, g, g)
    assert gen.bridge(feat, grid_masks).shape == (b * k, o, g * g, c)
    # target tokens
    t_tok, pos = gen.encode_target(target, torch.randn(1, 256, 64, 64))
    assert t_tok.shape == (b, g * g, c) and pos.shape == (1, g * g, c)
    # 3. selective map + CCM inside the full forward
    out = gen(target, support, masks)
    assert out.selective_map.shape == (b, o, g * g, k * g * g)
    assert out.context.shape == (b, o, g * g, c)
    assert out.prompts.shape == (b, o, cfg.num_tokens, 256)
    # CCM alone keeps both token sets' shapes
    ccm = ContextualColorization(c, 4, 2, 2.0)
    assert len(ccm.blocks) == 4
    tt, cc = ccm(torch.randn(b * o, g * g, c), torch.randn(b * o, 3, c), pos)
    assert tt.shape == (b * o, g * g, c) and cc.shape == (b * o, 3, c)


def test_selective_map_rows_sum_to_one() -> None:
    g = torch.Generator().manual_seed(1)
    smap = selective_map(
        torch.randn(2, 3, 10, 16, generator=g) * 5, torch.randn(2, 3, 40, 16, generator=g) * 5
    )
    assert smap.shape == (2, 3, 10, 40)
    assert (smap >= 0).all()
    torch.testing.assert_close(smap.sum(-1), torch.ones(2, 3, 10))
    # and inside the generator (K = 4, 2 objects)
    out = ProxyPromptGenerator(**SMALL)(*_inputs(1, 4, 2))
    torch.testing.assert_close(out.selective_map.sum(-1), torch.ones(out.selective_map.shape[:-1]))


def test_selective_map_scaling_is_sqrt_c() -> None:
    t, s = torch.randn(4, 9), torch.randn(6, 9)
    expected = torch.softmax(t @ s.T / 3.0, dim=-1)
    torch.testing.assert_close(selective_map(t, s), expected)


def test_support_masks_matter() -> None:
    """Changing the support mask changes the prompts (the mask is an input, not ignored)."""
    torch.manual_seed(0)
    gen = ProxyPromptGenerator(**SMALL).eval()
    target, support, masks = _inputs(1, 2, 1)
    a = gen(target, support, masks).prompts
    b = gen(target, support, ~masks).prompts
    assert not torch.allclose(a, b)


def test_bad_shapes_raise() -> None:
    gen = ProxyPromptGenerator(**SMALL)
    target, support, masks = _inputs(2, 1, 1)
    with pytest.raises(ValueError, match="expected target"):
        gen(target, support[:, 0], masks)
    with pytest.raises(ValueError, match="batch/support sizes differ"):
        gen(target[:1], support, masks)
    with pytest.raises(ValueError, match="channels"):
        gen(target, support[:, :, :8], masks)


def test_prompt_reaches_decoder_with_right_shape(tiny_sam: torch.nn.Module) -> None:
    """The generated tokens are SAM's ``sparse_prompt_embeddings``: compare with the decoder's own forward."""
    torch.manual_seed(0)
    gen = ProxyPromptGenerator(**SMALL).eval()
    target, support, masks = _inputs(2, 4, 2)
    with torch.no_grad():
        logits, out = generate_and_decode(gen, tiny_sam, target, support, masks)
    assert logits.shape == (2, 2, 256, 256)
    prompts = out.prompts
    assert prompts.shape == (2, 2, 3, 256)
    # reference: segment-anything's MaskDecoder.forward, one (image, object) at a time
    pe = tiny_sam.prompt_encoder.get_dense_pe()
    for i in range(2):
        for j in range(2):
            dense = no_mask_dense(tiny_sam, 1, (64, 64))
            ref, _ = tiny_sam.mask_decoder(
                image_embeddings=target[i : i + 1],
                image_pe=pe,
                sparse_prompt_embeddings=prompts[i, j][None],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(logits[i, j], ref[0, 0], atol=1e-4, rtol=1e-4)
    # the dense embedding is SAM's no-mask embedding (what Sam.forward uses without a mask prompt)
    _, dense_ref = tiny_sam.prompt_encoder(points=None, boxes=None, masks=None)
    torch.testing.assert_close(no_mask_dense(tiny_sam, 1, (64, 64)), dense_ref)
    # the prompts matter for the decoded mask
    other, _ = decode_sparse(tiny_sam, target[:1], torch.zeros(1, 3, 256))
    assert not torch.allclose(other[0, 0], logits[0, 0])


def test_gradients_reach_generator_not_frozen_sam(tiny_sam: torch.nn.Module) -> None:
    torch.manual_seed(0)
    sam = copy.deepcopy(tiny_sam).requires_grad_(False)  # the fixture is shared by the session
    gen = ProxyPromptGenerator(**SMALL)
    target, support, masks = _inputs(2, 1, 1)
    logits, _ = generate_and_decode(gen, sam, target, support, masks)
    logits.sigmoid().mean().backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    assert any(float(p.grad.abs().sum()) > 0 for p in gen.parameters())
    assert all(p.grad is None for p in sam.parameters())


def test_timm_contextual_encoder_on_pixels() -> None:
    """A timm backbone by name over raw support pixels + mask (4 input channels, random init)."""
    cfg = ProxyPromptConfig(backbone="resnet18", support_size=64, timm_out_index=2, **SMALL)
    enc = ContextualEncoder(cfg)
    assert enc.backbone is not None
    pixels = torch.randint(0, 256, (3, 3, 50, 70)).float()
    mask = torch.rand(3, 50, 70) > 0.5
    assert enc(pixels, mask).shape == (3, cfg.dim, cfg.grid, cfg.grid)
    gen = ProxyPromptGenerator(cfg)
    out = gen(torch.randn(1, 256, 64, 64), pixels[None, :2], mask[None, :2, None])
    assert out.prompts.shape == (1, 1, cfg.num_tokens, 256)
    with pytest.raises(ValueError, match="pixels"):
        enc(torch.randn(2, 256, 8, 8), mask[:2])


def test_bridge_unit_duplicates_support_per_object() -> None:
    """Two identical object masks give identical tokens; different masks give different ones."""
    torch.manual_seed(0)
    bridge = BridgeUnit(16, 4).eval()
    feat = torch.randn(2, 16, 6, 6)
    m = torch.rand(2, 1, 6, 6)
    same = bridge(feat, torch.cat([m, m], 1))
    torch.testing.assert_close(same[:, 0], same[:, 1])
    diff = bridge(feat, torch.cat([m, 1 - m], 1))
    assert not torch.allclose(diff[:, 0], diff[:, 1])
