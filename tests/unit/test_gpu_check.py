"""``experiments/gpu_check.sh`` without a GPU: the dry run lists every step; a real run refuses clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )


def test_dry_run_lists_the_gpu_steps(tmp_path: Path) -> None:
    p = _run("--dry-run", "--out", str(tmp_path), "--bundle", "/bundle")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[dry-run]")]
    names = [ln.split()[1] for ln in lines]
    assert names == [
        "install",
        "device",
        "tests_cuda",
        "quickstart_16-mixed",
        "quickstart_bf16-mixed",
        "throughput_gpu",
        "throughput_cpu_ref",
    ]
    text = "\n".join(lines)
    assert "--find-links /bundle/wheels" in text
    assert "-k cuda tests/unit/test_devices.py tests/integration/test_fit_devices.py" in text
    for prec in ("16-mixed", "bf16-mixed"):
        assert f"--trainer.precision={prec}" in text
    qs = next(ln for ln in lines if "quickstart_16-mixed" in ln)
    for opt in (
        "--config configs/quickstart.yaml",
        "--trainer.accelerator=gpu",
        "--data.init_args.decoder_backend=torch",
        "--data.init_args.cache.dino_name=tiny",
        "--data.init_args.cache.sam_checkpoint=/bundle/mobile_sam_fp16.pt",
    ):
        assert opt in qs, opt
    tp = next(ln for ln in lines if "throughput_gpu" in ln)
    assert "train_throughput.py --accelerator gpu" in tp
    # the timeouts fit the 8-minute budget only together with the script's budget clamp
    summary = (tmp_path / "summary.md").read_text()
    assert "Dry run" in summary and summary.count("| dry run |") == 7


def test_without_cuda_it_refuses_with_a_reason(tmp_path: Path) -> None:
    import os

    p = _run("--out", str(tmp_path), env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))  # hides any GPU
    assert p.returncode == 3
    assert "no CUDA device" in p.stderr
    assert "no CUDA device" in (tmp_path / "summary.md").read_text()


def test_unknown_option_is_rejected() -> None:
    p = _run("--frobnicate")
    assert p.returncode == 2 and "unknown option --frobnicate" in p.stderr
