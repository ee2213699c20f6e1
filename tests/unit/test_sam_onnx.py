"""ONNX Runtime mask decoder: same logits as the eager decoder, cached export, corrupt-file rebuild."""

from __future__ import annotations

import pytest
import torch

from ppd.env.prompt_env import NEGATIVE, POSITIVE, PromptEnv
from ppd.models.sam import decode
from ppd.models.sam_onnx import OnnxDecoder

G = 8


@pytest.fixture(scope="module")
def onnx_dec(tiny_sam, tmp_path_factory) -> OnnxDecoder:
    return OnnxDecoder(tiny_sam, threads=1, cache=tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("b,n", [(1, 1), (3, 4), (2, 11)])
def test_onnx_decoder_matches_eager(tiny_sam, onnx_dec, b: int, n: int) -> None:
    g = torch.Generator().manual_seed(b * 10 + n)
    emb = torch.randn(b, 256, 64, 64, generator=g)
    pts = torch.rand(b, n, 2, generator=g) * 1000
    lab = torch.randint(0, 2, (b, n), generator=g)
    lab[0, -1] = -1 if n > 1 else lab[0, -1]  # a padding point in the first set
    ref_logits, ref_iou = decode(tiny_sam, emb, pts, lab)
    logits, iou = onnx_dec(emb, pts, lab)
    assert logits.shape == ref_logits.shape == (b, 1, 256, 256)
    assert iou.shape == ref_iou.shape == (b, 1)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(iou, ref_iou, atol=1e-5)


def test_shared_embedding_is_broadcast(tiny_sam, onnx_dec) -> None:
    emb = torch.randn(1, 256, 64, 64)
    pts = torch.rand(3, 2, 2) * 1000
    lab = torch.ones(3, 2, dtype=torch.long)
    assert torch.allclose(onnx_dec(emb, pts, lab)[0], decode(tiny_sam, emb, pts, lab)[0], atol=1e-4)


def test_export_is_cached_and_corrupt_file_is_rebuilt(tiny_sam, tmp_path, caplog) -> None:
    first = OnnxDecoder(tiny_sam, threads=1, cache=tmp_path)
    files = list(tmp_path.glob("*.onnx"))
    assert files == [first.path]  # no temp file left behind
    mtime = first.path.stat().st_mtime_ns
    assert OnnxDecoder(tiny_sam, threads=1, cache=tmp_path).path.stat().st_mtime_ns == mtime  # reused
    first.path.write_bytes(b"not an onnx graph")
    with caplog.at_level("WARNING"):
        again = OnnxDecoder(tiny_sam, threads=1, cache=tmp_path)
    assert "re-exporting" in caplog.text
    emb, pts, lab = (
        torch.randn(1, 256, 64, 64),
        torch.rand(1, 3, 2) * 1000,
        torch.ones(1, 3, dtype=torch.long),
    )
    assert torch.allclose(again(emb, pts, lab)[0], decode(tiny_sam, emb, pts, lab)[0], atol=1e-4)


def test_other_weights_get_another_graph(tiny_sam, tmp_path) -> None:
    from ppd.models.sam import build_sam

    other = build_sam("tiny")
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(1.0)
    assert OnnxDecoder(tiny_sam, cache=tmp_path).path != OnnxDecoder(other, cache=tmp_path).path


def test_env_rewards_agree_between_backends(tiny_sam, tiny_env_inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PPD_CACHE", str(tmp_path))
    feats, masks = tiny_env_inputs
    envs = [PromptEnv(tiny_sam, feats, masks, grid=G, decoder_backend=b) for b in ("torch", "onnx")]
    status = torch.zeros(3, G * G, dtype=torch.long)
    status[:, [3, 10, 20]] = POSITIVE
    status[1, [40, 41]] = NEGATIVE
    ids = torch.tensor([0, 1, 2])
    a, b = (e.low_res_logits(ids, status) for e in envs)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(envs[0].dice_of(ids, status), envs[1].dice_of(ids, status))
    with pytest.raises(ValueError, match="decoder_backend"):
        PromptEnv(tiny_sam, feats, masks, grid=G, decoder_backend="tensorrt")
