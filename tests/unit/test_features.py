"""Feature cache: hits/misses, keys, atomic writes, corrupt entries, config CLI (tiny random encoders)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ppd.data.features import FeatureCache, atomic_torch_save, image_key
from tests.helpers.synthetic import make_samples, write_folder_dataset


def _cache(root: Path) -> FeatureCache:
    return FeatureCache(root=str(root), sam_variant="tiny", dino_name="tiny", dino_resolution=112)


def test_miss_then_hit_returns_identical_features(tmp_path: Path) -> None:
    s = make_samples(1, seed=1)[0]
    c = _cache(tmp_path)
    f1 = c.get(s.image)
    assert (c.hits, c.misses) == (0, 2)
    assert f1.sam_embedding.shape == (256, 64, 64) and f1.sam_embedding.dtype == torch.float16
    assert f1.dino_tokens.shape == (8, 8, 48) and f1.dino_tokens.dtype == torch.float16
    assert f1.original_size == s.mask.shape
    assert max(f1.input_size) == 1024
    c2 = _cache(tmp_path)  # a new process would build a new cache object
    f2 = c2.get(s.image)
    assert (c2.hits, c2.misses) == (2, 0)
    assert torch.equal(f1.sam_embedding, f2.sam_embedding) and torch.equal(f1.dino_tokens, f2.dino_tokens)
    assert c2._sam_encoder is None and c2._dino is None  # hits never build the encoders


def test_key_depends_on_pixels_model_and_resolution(tmp_path: Path) -> None:
    a, b = make_samples(2, seed=2)
    assert image_key(a.image) != image_key(b.image)
    assert image_key(a.image) == image_key(a.image.copy())
    c1 = _cache(tmp_path)
    c2 = FeatureCache(root=str(tmp_path), sam_variant="tiny", dino_name="tiny", dino_resolution=224)
    c1.get(a.image)
    c2.get(a.image)
    assert c2.hits == 1 and c2.misses == 1  # SAM entry shared, DINOv2 entry per resolution
    assert c2.get(a.image).dino_tokens.shape[:2] == (16, 16)


def test_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_samples(1, seed=3)[0]
    c = _cache(tmp_path)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # write part of the payload, then die as a kill would
        real_save(obj, f, *a, **k)
        f.truncate(100)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        c.get(s.image)
    monkeypatch.setattr(torch, "save", real_save)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial files left behind: {leftovers}"
    assert not c.contains(s.image)
    f = _cache(tmp_path).get(s.image)  # recomputed cleanly afterwards
    assert f.sam_embedding.shape == (256, 64, 64)


def test_corrupt_entry_is_recomputed_with_warning(tmp_path: Path) -> None:
    s = make_samples(1, seed=4)[0]
    c = _cache(tmp_path)
    good = c.get(s.image)
    path = c.sam_dir / f"{good.key}.pt"
    path.write_bytes(b"not a torch file")
    c2 = _cache(tmp_path)
    with pytest.warns(UserWarning, match="corrupt feature-cache entry"):
        again = c2.get(s.image)
    assert torch.equal(again.sam_embedding, good.sam_embedding)
    assert c2.misses == 1 and c2.hits == 1
    # and it is a valid entry again
    assert torch.load(path, weights_only=True)["embedding"].shape == (256, 64, 64)


def test_atomic_save_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(3)}, p)
    atomic_torch_save({"a": torch.zeros(5)}, p)
    assert torch.load(p, weights_only=True)["a"].shape == (5,)
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]


def test_ensure_shards_by_rank(tmp_path: Path) -> None:
    samples = make_samples(5, seed=5)
    c = _cache(tmp_path)
    st0 = c.ensure(samples, progress=False, rank=0, world_size=2)
    st1 = c.ensure(samples, progress=False, rank=1, world_size=2)
    assert (st0["images"], st1["images"]) == (3, 2)
    assert all(c.contains(s.image) for s in samples)
    assert c.ensure(samples, progress=False)["misses"] == 0


def test_unknown_config_field_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown FeatureCacheConfig field 'dino_res'"):
        FeatureCache(root=str(tmp_path), dino_res=3)


def test_cache_cli_reads_fit_style_config(tmp_path: Path) -> None:
    from ppd.cache import main

    root = write_folder_dataset(tmp_path / "ds", n=3, seed=6)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n  init_args:\n"
        f"    train: {{root: {root}, kind: folder}}\n"
        f"    cache: {{root: {tmp_path / 'cache'}, sam_variant: tiny, dino_name: tiny, dino_resolution: 112}}\n"
    )
    assert main(["--config", str(cfg), "--quiet"]) == 0
    c = _cache(tmp_path / "cache")
    from ppd.data.datasets import SegmentationFolder

    assert all(c.contains(s.image) for s in SegmentationFolder(root))


def test_cache_cli_rejects_unknown_cache_field(tmp_path: Path) -> None:
    from ppd.cache import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: [{root: x}]\ncache: {sam: tiny}\n")
    with pytest.raises(ValueError, match="unknown cache fields"):
        main(["--config", str(cfg)])


def test_features_are_reproducible_across_cache_instances(tmp_path: Path) -> None:
    s = make_samples(1, seed=7)[0]
    a = _cache(tmp_path / "a").get(s.image)
    torch.manual_seed(0)
    b = _cache(tmp_path / "b").get(s.image)
    assert a.key == b.key
    assert np.isfinite(a.dino_tokens.float().numpy()).all()
