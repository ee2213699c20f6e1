"""The SAMPO rows of the evaluation registry on the tiny SAM: same seeded clicks for every row, adapters
merged from files, rows without an adapter skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ppd.eval import EvalConfig, EvalDataset, Evaluator, get_method
from ppd.tasks.sampo import SAMPOTask
from tests.helpers.defender import TINY_ENV
from tests.helpers.synthetic import synthetic_pair, write_folder_dataset


def test_sampo_rows_are_registered() -> None:
    for name in ("sam_sparse", "sampo", "sam_finetuned_sup", "sampo_no_po1", "sampo_no_po2"):
        m = get_method(name)
        assert m.output == "mask"
        assert m.needs == (() if name == "sam_sparse" else ("checkpoint",))


def test_sampo_rows_share_clicks_and_use_their_adapter(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", n=4)
    task = SAMPOTask(sam_variant="tiny", sam_checkpoint=None, lora_rank=4)
    task.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in task.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # a clearly non-zero adapter
    adapter = task.export_adapter(tmp_path / "sampo.pt")
    cfg = EvalConfig(
        output_dir=str(tmp_path / "out"),
        datasets=[EvalDataset(name="syn", root=str(root))],
        methods=["sam_sparse", "sampo", "sam_finetuned_sup"],
        checkpoints={"sampo": str(adapter)},
        method_options={"sam_sparse": {"points": [3, 3]}, "sampo": {"points": [3, 3]}},
        env=dict(TINY_ENV),
        cache={"root": str(tmp_path / "cache")},
        paired=[["sampo", "sam_sparse"]],
        bootstrap={"resamples": 100, "confidence": 0.95},
    )
    res = Evaluator(cfg, progress=False).run()
    sec = res["datasets"][0]
    assert sec["methods"]["sam_finetuned_sup"]["skipped"].startswith("no checkpoint configured")
    caches = {
        p.name.split("__")[0]: json.loads(p.read_text()) for p in (tmp_path / "out" / "cache").iterdir()
    }
    a, b = caches["sam_sparse"]["records"], caches["sampo"]["records"]
    assert a.keys() == b.keys() and len(a) >= 3
    masks_differ = False
    for s in a:
        assert a[s]["points"] == b[s]["points"] and a[s]["labels"] == b[s]["labels"]  # same clicks
        _, gt = synthetic_pair(int(s))
        for (x, y), lab in zip(a[s]["points"], a[s]["labels"], strict=True):
            assert gt[int(y), int(x)] == bool(lab)  # positives inside, negatives outside the GT
        assert sorted(a[s]["labels"]) == [0, 0, 0, 1, 1, 1]
        masks_differ |= (
            a[s] != b[s]
            or sec["methods"]["sampo"]["per_image"][s] != sec["methods"]["sam_sparse"]["per_image"][s]
        )
    assert masks_differ, "the adapter had no effect"
    assert any(p["a"] == "sampo" for p in sec["paired"])
    assert np.isfinite(sec["methods"]["sampo"]["mdsc"])
