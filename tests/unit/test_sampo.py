"""SAMPO: preference mining, prompt-set synthesis, frozen reference, LoRA-only updates, adapter files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ppd.baselines.preference import mask_iou, mine_inter_prompt, mine_intra_prompt, synthesize_prompt_sets
from ppd.baselines.sparse import predict_sparse
from ppd.data.config import DatasetConfig
from ppd.data.features import FeatureCacheConfig
from ppd.data.segmentation import SegmentationDataModule
from ppd.models.lora import AdapterError, apply_adapter, load_adapter, save_adapter
from ppd.models.sam import build_sam, decode
from ppd.tasks.sampo import SAMPOTask
from tests.helpers.synthetic import write_folder_dataset

TINY = dict(sam_variant="tiny", sam_checkpoint=None, lora_rank=4, n_prompt_sets=3)


@pytest.fixture(scope="module")
def dm(tmp_path_factory: pytest.TempPathFactory) -> SegmentationDataModule:
    tmp = tmp_path_factory.mktemp("sampo")
    d = SegmentationDataModule(
        train=DatasetConfig(root=str(write_folder_dataset(tmp / "tr", n=4, seed=1))),
        val=DatasetConfig(root=str(write_folder_dataset(tmp / "va", n=2, seed=2))),
        cache=FeatureCacheConfig(
            root=str(tmp / "c"), sam_variant="tiny", dino_name="tiny", dino_resolution=112
        ),
        batch_size=2,
        shuffle=False,
    )
    d.setup()
    return d


def _batch(dm: SegmentationDataModule) -> dict[str, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


def test_mining_on_a_constructed_example() -> None:
    # one image, N = 3 prompt sets, M = 3 slots
    iou = torch.tensor(
        [
            [
                [0.2, 0.9, 0.5],  # set 0
                [0.7, 0.1, 0.5],  # set 1
                [0.4, 0.3, 0.5],  # set 2 (slot 2 ties everywhere)
            ]
        ]
    )
    w, lo, v = mine_inter_prompt(iou)
    assert w.tolist() == [[1, 0, 0]] and lo.tolist() == [[0, 1, 0]]
    assert v.tolist() == [[True, True, False]]  # slot 2: all equal -> no preference
    w, lo, v = mine_intra_prompt(iou)
    assert w.tolist() == [[1, 0, 2]] and lo.tolist() == [[0, 1, 1]]
    assert v.tolist() == [[True, True, True]]
    with pytest.raises(ValueError, match="B, N, M"):
        mine_inter_prompt(iou[0])


def test_mask_iou() -> None:
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[:2, :2] = True
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, :2, :] = True  # 4 of 8
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[:, 3] = False  # pred[0] has 6 valid pixels -> 4/6
    assert mask_iou(pred, gt).tolist() == [0.5, 0.0]
    assert mask_iou(pred, gt, valid)[0].item() == pytest.approx(4 / 6)
    assert mask_iou(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)).item() == 1.0


def test_prompt_set_synthesis_limits_and_poor_sets() -> None:
    gt = torch.zeros(40, 50, dtype=torch.bool)
    gt[10:30, 10:30] = True
    g = torch.Generator().manual_seed(0)
    pts, lab = synthesize_prompt_sets(gt, 200, 3, 3, p_poor=0.5, generator=g)
    assert pts.shape[0] == 200 and pts.shape[1] <= 6
    inside = gt[pts[..., 1].long(), pts[..., 0].long()]
    real = lab >= 0
    assert ((lab == 1) & real).sum(1).max() <= 3 and ((lab == 0) & real).sum(1).max() <= 3
    wrong = real & (inside != (lab == 1))
    n_bad = wrong.any(1).sum().item()
    assert 60 < n_bad < 140  # about half the sets are corrupted, each by one click
    assert wrong.sum(1).max() <= 1
    clean, clab = synthesize_prompt_sets(gt, 50, 3, 3, p_poor=0.0, generator=g)
    ok = clab >= 0
    assert (gt[clean[..., 1].long(), clean[..., 0].long()] == (clab == 1))[ok].all()
    assert ((clab == 1).sum(1) >= 1).all()


def test_dpo_terms_start_at_log2_and_sup_only_has_no_po(dm: SegmentationDataModule) -> None:
    b = _batch(dm)
    out = SAMPOTask(**TINY).sampo_losses(b)
    assert out["l_po1"].item() == pytest.approx(np.log(2), abs=1e-5)  # pi_theta == pi_ref at init
    assert out["l_po2"].item() == pytest.approx(np.log(2), abs=1e-5)
    sup = SAMPOTask(**TINY, use_po=False).sampo_losses(b)
    assert "l_po" not in sup and sup["loss"].item() == pytest.approx(sup["l_sup"].item())
    no1 = SAMPOTask(**TINY, use_po1=False).sampo_losses(b)
    assert "l_po1" not in no1 and "l_po2" in no1
    no2 = SAMPOTask(**TINY, use_po2=False).sampo_losses(b)
    assert "l_po2" not in no2 and "l_po1" in no2
    with pytest.raises(ValueError, match="nothing to train"):
        SAMPOTask(**TINY, use_po=False, use_sup=False)
    with pytest.raises(ValueError, match="loglik_reduction"):
        SAMPOTask(**TINY, loglik_reduction="max")


def _train(task: SAMPOTask, dm: SegmentationDataModule, steps: int) -> None:
    opt = task.configure_optimizers()
    for _ in range(steps):
        for b in dm.train_dataloader():
            opt.zero_grad()
            task.sampo_losses(b)["loss"].backward()
            opt.step()
            task.train_steps += 1


def test_reference_frozen_and_only_lora_changes(dm: SegmentationDataModule) -> None:
    task = SAMPOTask(**TINY, lr=1e-2)
    assert task.peft is None  # nothing built (no weights read) before configure_model
    task.configure_model()
    emb = dm.split("train").embeddings[0][None].float()
    pts = torch.tensor([[[300.0, 200.0], [600.0, 500.0]]])
    lab = torch.tensor([[1, 0]])
    before = {k: v.clone() for k, v in task.state_dict().items()}
    with task.peft.disable_adapter():
        ref0, _ = decode(task.sam, emb, pts, lab, multimask_output=True)
    pol0, _ = decode(task.sam, emb, pts, lab, multimask_output=True)
    assert torch.allclose(pol0, ref0)
    _train(task, dm, 2)
    with task.peft.disable_adapter():
        ref1, _ = decode(task.sam, emb, pts, lab, multimask_output=True)
    pol1, _ = decode(task.sam, emb, pts, lab, multimask_output=True)
    assert torch.equal(ref0, ref1), "pi_ref changed during training"
    assert not torch.allclose(pol1, pol0), "the policy did not change"
    after = task.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing changed"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)[:5]
    assert any("lora_B" in k for k in changed)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(n.split(".")[3] == "mask_decoder" for n in trainable)  # peft.base_model.model.<part>


def test_adapter_roundtrip_checkpoint_and_bad_files(dm: SegmentationDataModule, tmp_path: Path) -> None:
    task = SAMPOTask(**TINY, lr=1e-2)
    _train(task, dm, 1)
    path = task.export_adapter(tmp_path / "a" / "adapter.pt")
    assert path.stat().st_size < 2_000_000
    ad = load_adapter(path)
    assert ad["sam_variant"] == "tiny" and ad["parts"] == ["mask_decoder"] and ad["meta"]["use_po"] is True
    merged = apply_adapter(build_sam("tiny", None), ad, sam_variant="tiny")
    f = dm.split("val")
    emb = f.embeddings[0].float()
    info = f.info(0)
    p1 = predict_sparse(
        task.sam, emb, info.input_size, info.original_size, info.gt, torch.Generator().manual_seed(0)
    )
    p2 = predict_sparse(
        merged, emb, info.input_size, info.original_size, info.gt, torch.Generator().manual_seed(0)
    )
    assert torch.equal(p1.points, p2.points) and p1.mask.shape == info.gt.shape
    assert (p1.mask == p2.mask).mean() > 0.999
    # bad files: one clear error naming the file
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(AdapterError, match="junk.pt"):
        load_adapter(junk)
    other = tmp_path / "other.pt"
    save_adapter({"format": "something"}, other)
    with pytest.raises(AdapterError, match="format"):
        load_adapter(other)
    with pytest.raises(AdapterError, match="vit_t"):
        apply_adapter(build_sam("tiny", None), ad, sam_variant="vit_t")
    from ppd.export_lora import main

    assert main(["--info", str(path)]) == 0
    assert main(["--info", str(junk)]) == 2


def test_checkpoint_holds_only_lora_and_restores(dm: SegmentationDataModule, tmp_path: Path) -> None:
    import lightning as L

    task = SAMPOTask(**TINY, lr=1e-2, export_path=str(tmp_path / "adapter.pt"))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        limit_val_batches=1,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=dm)
    assert "val/mdsc" in trainer.callback_metrics and "val/mdsc_ref" in trainer.callback_metrics
    assert 0.0 <= float(trainer.callback_metrics["val/mdsc"]) <= 1.0
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else None
    ckpt = ckpt or next(tmp_path.rglob("*.ckpt"))
    st = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert st["state_dict"] and all("lora_" in k for k in st["state_dict"])
    assert st["sampo"]["train_steps"] == 2
    from ppd.export_lora import export_checkpoint

    out = export_checkpoint(ckpt, tmp_path / "exported.pt")
    a, b = load_adapter(out)["state_dict"], load_adapter(tmp_path / "adapter.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained LoRA differs from a fresh one
    fresh = SAMPOTask(**TINY).adapter()["state_dict"]
    assert any(not torch.equal(a[k], fresh[k]) for k in a if "lora_B" in k)
