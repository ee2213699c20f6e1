"""SegmentationDataModule on synthetic folders with the tiny random SAM (cached in tmp)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCacheConfig
from ppd.data.segmentation import EpochSampler, SegmentationDataModule
from ppd.models.sam import gt_to_low_res, low_res_valid_size
from tests.helpers.synthetic import write_folder_dataset

TINY_CACHE = dict(sam_variant="tiny", dino_name="tiny", dino_resolution=112)


def _dm(tmp_path: Path, n_train: int = 5, n_val: int = 3, **kw: object) -> SegmentationDataModule:
    tr = write_folder_dataset(tmp_path / "train", n=n_train, seed=1)
    va = write_folder_dataset(tmp_path / "val", n=n_val, seed=2)
    return SegmentationDataModule(
        train=DatasetConfig(root=str(tr)),
        val=DatasetConfig(root=str(va)),
        cache=FeatureCacheConfig(root=str(tmp_path / "cache"), **TINY_CACHE),
        **kw,
    )


def test_batches_shapes_and_low_res_gt(tmp_path: Path) -> None:
    dm = _dm(tmp_path, batch_size=2, shuffle=False)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["embedding"].shape == (2, 256, 64, 64) and b["embedding"].dtype == torch.float16
    assert b["gt_low"].shape == b["valid"].shape == (2, 1, 256, 256)
    assert b["index"].tolist() == [0, 1]
    assert b["input_size"].shape == b["original_size"].shape == (2, 2)
    info = dm.sample_info("train", 1)
    assert info.stem == "1" and info.gt.shape == info.original_size == (48, 64)
    h4, w4 = low_res_valid_size(info.input_size)
    assert b["valid"][1, 0].sum().item() == h4 * w4
    assert b["valid"][1, 0, :h4, :w4].all() and not b["valid"][1, 0, h4:].any()
    assert torch.equal(b["gt_low"][1, 0, :h4, :w4].bool(), gt_to_low_res(info.gt, info.input_size))
    assert b["gt_low"][1, 0].sum() > 0
    assert not (b["gt_low"] * (1 - b["valid"])).any()  # no GT in the padding
    assert "support_embedding" not in b
    assert len(list(dm.val_dataloader())) == 2  # 3 images, batch 2


def test_limit_subsets(tmp_path: Path) -> None:
    dm = _dm(tmp_path)
    dm.train_cfg.limit = 2
    dm.setup()
    assert dm.split("train").stems == ["0", "1"]


def test_support_sets_exclude_target_and_are_deterministic(tmp_path: Path) -> None:
    dm = _dm(tmp_path, batch_size=5, support_size=2, shuffle=False)
    dm.setup()
    train = dm.split("train")
    b = next(iter(dm.train_dataloader()))
    assert b["support_embedding"].shape == (5, 2, 256, 64, 64)
    assert b["support_gt_low"].shape == (5, 2, 1, 256, 256) and b["support_index"].shape == (5, 2)
    for t, sup in zip(b["index"].tolist(), b["support_index"].tolist(), strict=True):
        assert t not in sup and len(set(sup)) == 2
        for j, s in enumerate(sup):  # the stacked support tensors are those of the drawn indices
            assert torch.equal(b["support_gt_low"][b["index"].tolist().index(t), j], train.gt_low[s])
    # per-epoch redraw during training, identical for the same epoch
    e0 = [train.support_indices(i, 0) for i in range(5)]
    assert e0 == [train.support_indices(i, 0) for i in range(5)]
    assert e0 != [train.support_indices(i, 1) for i in range(5)]
    # the sampler carries the epoch into the dataset
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    b1 = next(iter(loader))
    assert [train.support_indices(i, 1) for i in b1["index"].tolist()] == b1["support_index"].tolist()
    # validation: fixed per stem, drawn from the training set
    val = dm.split("val")
    assert val.support_indices(0, 0) == val.support_indices(0, 7)
    vb = next(iter(dm.val_dataloader()))
    assert vb["support_index"].max() < len(train)


def test_support_size_too_large_is_a_clear_error(tmp_path: Path) -> None:
    dm = _dm(tmp_path, n_train=2, support_size=2)
    dm.setup()
    with pytest.raises(ValueError, match="support_size 2"):
        dm.split("train")[0]


def test_epoch_sampler_shuffles_per_epoch() -> None:
    s = EpochSampler(6, shuffle=True, seed=0)
    a = [i for i, _ in s]
    s.set_epoch(1)
    b = list(s)
    assert sorted(a) == list(range(6)) and [i for i, _ in b] != a and {e for _, e in b} == {1}


def test_uncached_images_for_encoder_lora(tmp_path: Path) -> None:
    dm = _dm(tmp_path, batch_size=2, cache_embeddings=False, shuffle=False)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert "embedding" not in b and b["image"].shape == (2, 3, 1024, 1024) and b["image"].dtype == torch.uint8
    h, w = b["input_size"][0].tolist()
    assert max(h, w) == 1024 and not b["image"][0, :, h:, :].any()
    assert not (tmp_path / "cache").exists()  # nothing cached


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SegmentationDataModule(train=DatasetConfig(root="x"), batch_size=0)
    with pytest.raises(ValueError, match="support_size"):
        SegmentationDataModule(train=DatasetConfig(root="x"), support_size=-1)
    dm = SegmentationDataModule(train=DatasetConfig(root="x"))
    with pytest.raises(RuntimeError, match="setup"):
        dm.split("train")
