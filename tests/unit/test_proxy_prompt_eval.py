"""Eval rows ``proxy_prompt`` / ``proxy_prompt_untrained``: support drawn from the training split and recorded,
the trained row loads its checkpoint, a missing checkpoint skips the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ppd.eval import EvalConfig, EvalDataset, Evaluator
from ppd.inference import PromptDefender
from ppd.tasks.proxy_prompt import ProxyPromptTask, draw_support
from tests.helpers.defender import TINY_ENV, FakeFeatureCache
from tests.helpers.synthetic import write_folder_dataset

GEN = {"dim": 32, "grid": 8, "mask_dim": 8, "num_tokens": 2, "depth": 4, "heads": 2}


def _checkpoint(path: Path, init_seed: int) -> Path:
    """A ProxyPromptTask checkpoint whose generator is the seeded random init (= the untrained row)."""
    task = ProxyPromptTask(sam_variant="tiny", sam_checkpoint=None, generator=GEN, seed=init_seed)
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _cfg(tmp_path: Path, checkpoint: Path | None, k: int) -> EvalConfig:
    val = write_folder_dataset(tmp_path / "val", n=4, seed=5)
    train = write_folder_dataset(tmp_path / "train", n=6, seed=9)
    support = {"root": str(train), "split": ["0", "1", "2", "3", "4"], "k": k, "seed": 3}
    return EvalConfig(
        output_dir=str(tmp_path / "out"),
        datasets=[EvalDataset(name="syn", root=str(val))],
        methods=["proxy_prompt_untrained", "proxy_prompt"],
        checkpoints={"proxy_prompt": str(checkpoint)} if checkpoint else {},
        method_options={
            "proxy_prompt": {"support": support},
            "proxy_prompt_untrained": {"support": support, "generator": GEN, "init_seed": 7},
        },
        paired=[["proxy_prompt", "proxy_prompt_untrained"]],
        bootstrap={"resamples": 100, "confidence": 0.95},
    )


def _defender(tiny_sam: torch.nn.Module) -> PromptDefender:
    from ppd.models.qnet import QNetwork

    qnet = QNetwork(in_dim=53, hidden=16, layers=1, heads=2)
    return PromptDefender(qnet, dict(TINY_ENV), tiny_sam, FakeFeatureCache(), max_steps=2)


@pytest.mark.parametrize("k", [1, 4])
def test_rows_record_support_and_load_the_checkpoint(
    tmp_path: Path, tiny_sam: torch.nn.Module, k: int
) -> None:
    ck = _checkpoint(tmp_path / "pp.ckpt", init_seed=7)  # same weights as the untrained row (init_seed 7)
    cfg = _cfg(tmp_path, ck, k)
    res = Evaluator(cfg, defender=_defender(tiny_sam), progress=False).run()
    sec = res["datasets"][0]["methods"]
    trained, untrained = sec["proxy_prompt"], sec["proxy_prompt_untrained"]
    assert trained["n"] == untrained["n"] == 3  # 4 images, the (default) reference "0" excluded
    # identical weights -> identical per-image Dice: the checkpoint's generator was loaded
    for s, r in trained["per_image"].items():
        assert r["dice"] == pytest.approx(untrained["per_image"][s]["dice"], abs=1e-6)
    pool = ["0", "1", "2", "3", "4"]
    for p in (Path(cfg.output_dir) / "cache").iterdir():
        recs = json.loads(p.read_text())["records"]
        for stem, rec in recs.items():
            assert rec["support"] == [pool[i] for i in draw_support(pool, stem, k, seed=3)]
            assert rec["k"] == k and len(rec["support"]) == k


def test_different_weights_give_different_masks_and_missing_checkpoint_skips(
    tmp_path: Path, tiny_sam: torch.nn.Module
) -> None:
    ck = _checkpoint(tmp_path / "pp.ckpt", init_seed=1)
    res = Evaluator(_cfg(tmp_path, ck, 1), defender=_defender(tiny_sam), progress=False).run()
    sec = res["datasets"][0]["methods"]
    a = [r["dice"] for r in sec["proxy_prompt"]["per_image"].values()]
    b = [r["dice"] for r in sec["proxy_prompt_untrained"]["per_image"].values()]
    assert a != b
    res = Evaluator(_cfg(tmp_path / "no", None, 1), defender=_defender(tiny_sam), progress=False).run()
    sec = res["datasets"][0]["methods"]
    assert sec["proxy_prompt"]["skipped"].startswith("no checkpoint configured")
    assert sec["proxy_prompt_untrained"]["n"] == 3


def test_bad_support_options_name_the_field(tmp_path: Path, tiny_sam: torch.nn.Module) -> None:
    cfg = _cfg(tmp_path, None, 1)
    cfg.method_options["proxy_prompt_untrained"]["support"] = {"root": "x"}
    with pytest.raises(ValueError, match="support lacks"):
        Evaluator(cfg, defender=_defender(tiny_sam), progress=False).run()
