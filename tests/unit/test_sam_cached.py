"""Decoder with the image side cached per image: equal to segment_anything's MaskDecoder (tiny SAM).

The real-MobileSAM counterpart is ``tests/integration/test_sam_cached_real.py``.
"""

from __future__ import annotations

import pytest
import torch

from ppd.env.prompt_env import NEGATIVE, POSITIVE, PromptEnv
from ppd.models.sam import decode
from ppd.models.sam_cached import ImageSideCache, image_side_cache, predict_masks_cached
from ppd.models.sam_onnx import OnnxDecoder
from tests.helpers.sam_reference import assert_cached_matches_reference

G = 8


@pytest.mark.parametrize("b,n", [(1, 1), (3, 4), (2, 11)])
@pytest.mark.parametrize("multimask", [False, True])
def test_cached_decode_equals_segment_anything(tiny_sam, b: int, n: int, multimask: bool) -> None:
    assert_cached_matches_reference(tiny_sam, b, n, multimask, seed=10 * b + n)


def test_cache_holds_the_prompt_independent_projections(tiny_sam) -> None:
    emb = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        c = image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, emb)
        block = tiny_sam.mask_decoder.transformer.layers[0]
        keys = emb.flatten(2).transpose(1, 2) + tiny_sam.prompt_encoder.no_mask_embed.weight
        pe = tiny_sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        assert torch.allclose(c.keys, keys, atol=1e-6)
        assert torch.allclose(c.pe, pe)
        assert torch.allclose(c.k_t2i, block.cross_attn_token_to_image.k_proj(keys + pe), atol=1e-5)
        assert torch.allclose(c.v_t2i, block.cross_attn_token_to_image.v_proj(keys), atol=1e-5)
        assert torch.allclose(c.q_i2t, block.cross_attn_image_to_token.q_proj(keys + pe), atol=1e-5)
    assert c.batch == 2 and c.size == (64, 64)
    assert c.k_t2i.shape == (2, 64 * 64, 128)
    assert c.nbytes() == 4 * 64 * 64 * (256 + 3 * 128)


def test_rows_cat_and_expand(tiny_sam) -> None:
    emb = torch.randn(3, 256, 64, 64)
    pts = torch.rand(3, 2, 2) * 1000
    lab = torch.ones(3, 2, dtype=torch.long)
    with torch.no_grad():
        c = image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, emb)
        singles = [image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, e[None]) for e in emb]
        joined = ImageSideCache.cat([singles[2], singles[0]])
        assert torch.allclose(joined.k_t2i, c.rows([2, 0]).k_t2i, atol=1e-6)
        a = decode(tiny_sam, None, pts[:2], lab[:2], image_cache=joined)[0]
        ref = decode(tiny_sam, emb[[2, 0]], pts[:2], lab[:2])[0]
        assert torch.allclose(a, ref, atol=1e-5)
        shared = decode(tiny_sam, None, pts, lab, image_cache=singles[1])[0]  # one image, 3 prompt sets
        assert torch.allclose(shared, decode(tiny_sam, emb[1:2], pts, lab)[0], atol=1e-5)
    with pytest.raises(ValueError, match="broadcast"):
        c.expand(5)
    with pytest.raises(ValueError, match="embeddings or an image_cache"):
        decode(tiny_sam, None, pts, lab)
    with pytest.raises(ValueError, match="must be 1 or"):
        decode(tiny_sam, None, pts[:2], lab[:2], image_cache=c)


def test_cached_decode_keeps_gradients(tiny_sam) -> None:
    emb = torch.randn(1, 256, 64, 64)
    pts, lab = torch.rand(2, 3, 2) * 1000, torch.ones(2, 3, dtype=torch.long)
    c = image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, emb)
    logits, _ = decode(tiny_sam, None, pts, lab, grad=True, image_cache=c)
    logits.sum().backward()
    grad = tiny_sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny_sam.zero_grad(set_to_none=True)


def test_rejects_a_decoder_without_two_way_first_block(tiny_sam) -> None:
    import copy

    dec = copy.deepcopy(tiny_sam.mask_decoder)
    dec.transformer.layers[0].skip_first_layer_pe = False
    with pytest.raises(ValueError, match="skip_first_layer_pe"):
        image_side_cache(dec, tiny_sam.prompt_encoder, torch.zeros(1, 256, 64, 64))


@pytest.fixture(scope="module")
def onnx_cached(tiny_sam, tmp_path_factory) -> OnnxDecoder:
    return OnnxDecoder(tiny_sam, threads=1, cache=tmp_path_factory.mktemp("onnx"), image_cache=True)


@pytest.mark.parametrize("b,n", [(1, 1), (3, 4)])
def test_onnx_cached_decoder_matches_eager(tiny_sam, onnx_cached, b: int, n: int) -> None:
    g = torch.Generator().manual_seed(b + n)
    emb = torch.randn(b, 256, 64, 64, generator=g)
    pts = torch.rand(b, n, 2, generator=g) * 1000
    lab = torch.randint(0, 2, (b, n), generator=g)
    with torch.no_grad():
        c = image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, emb)
    ref_logits, ref_iou = decode(tiny_sam, emb, pts, lab)
    logits, iou = onnx_cached(None, pts, lab, image_cache=c)
    assert logits.shape == (b, 1, 256, 256) and iou.shape == (b, 1)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(iou, ref_iou, atol=1e-5)
    with pytest.raises(ValueError, match="image_cache=True"):
        onnx_cached(emb, pts, lab)


@pytest.mark.parametrize("level", ["disable", "basic", "extended"])
def test_onnx_optimisation_levels_agree(tiny_sam, tmp_path, level: str) -> None:
    emb, pts, lab = (
        torch.randn(1, 256, 64, 64),
        torch.rand(2, 3, 2) * 1000,
        torch.ones(2, 3, dtype=torch.long),
    )
    dec = OnnxDecoder(tiny_sam, threads=1, cache=tmp_path, optimization=level)
    assert torch.allclose(dec(emb, pts, lab)[0], decode(tiny_sam, emb, pts, lab)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="optimization"):
        OnnxDecoder(tiny_sam, cache=tmp_path, optimization="max")


def test_int8_decoder_is_a_quantised_graph_close_to_fp32(tiny_sam, tmp_path) -> None:
    import onnx

    fp32 = OnnxDecoder(tiny_sam, threads=1, cache=tmp_path)
    int8 = OnnxDecoder(tiny_sam, threads=1, cache=tmp_path, quantize=True)
    assert int8.path != fp32.path and int8.path.exists()
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    g = torch.Generator().manual_seed(0)
    emb, pts = torch.randn(1, 256, 64, 64, generator=g), torch.rand(2, 5, 2, generator=g) * 1000
    lab = torch.ones(2, 5, dtype=torch.long)
    a, b = fp32(emb, pts, lab)[0], int8(emb, pts, lab)[0]
    assert not torch.equal(a, b)  # really another computation
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert (
        corr > 0.8
    )  # tiny random weights; real MobileSAM agreement: experiments/benchmarks/env_throughput.py


@pytest.mark.parametrize("backend", ["torch_cached", "onnx_cached"])
def test_env_rewards_agree_with_the_eager_backend(
    tiny_sam, tiny_env_inputs, tmp_path, monkeypatch, backend
) -> None:
    monkeypatch.setenv("PPD_CACHE", str(tmp_path))
    feats, masks = tiny_env_inputs
    ref = PromptEnv(tiny_sam, feats, masks, grid=G, decoder_backend="torch")
    env = PromptEnv(
        tiny_sam, feats, masks, grid=G, decoder_backend=backend, image_cache_size=2, decode_chunk=2
    )
    status = torch.zeros(4, G * G, dtype=torch.long)
    status[:, [3, 10, 20]] = POSITIVE
    status[1, [40, 41]] = NEGATIVE
    ids = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(env.low_res_logits(ids, status), ref.low_res_logits(ids, status), atol=1e-4)
    # sets are decoded grouped by point count (ids 0, 2, 3 have 3 points, id 1 has 5): LRU keeps the last 2
    assert list(env._side) == [3, 1]
    assert env.timings.calls["image_side"] == 4
    env.low_res_logits(torch.tensor([3]), status[:1])
    assert env.timings.calls["image_side"] == 4  # a hit computes nothing
    assert torch.equal(env.dice_of(ids, status), ref.dice_of(ids, status))


def test_predict_masks_cached_returns_all_mask_tokens(tiny_sam) -> None:
    emb = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        c = image_side_cache(tiny_sam.mask_decoder, tiny_sam.prompt_encoder, emb)
        sparse, _ = tiny_sam.prompt_encoder(
            points=(torch.rand(2, 3, 2) * 1000, torch.ones(2, 3, dtype=torch.long)), boxes=None, masks=None
        )
        masks, iou = predict_masks_cached(tiny_sam.mask_decoder, c, sparse)
    assert masks.shape == (2, 4, 256, 256) and iou.shape == (2, 4)
