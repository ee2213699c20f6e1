"""``notebooks/quickstart.ipynb`` runs top to bottom (tiny encoders) and draws its figures."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.helpers.defender import write_tiny_defender

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_with_tiny_encoders(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    defender = write_tiny_defender(tmp_path / "defender.pt")
    env = dict(os.environ)
    env.update(
        {
            "PPD_NOTEBOOK_TINY": "1",
            "PPD_CACHE": str(tmp_path / "cache"),
            "PPD_DEFENDER": str(defender),
            "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "2",
        }
    )
    # kernel "python3": jupyter_client maps the kernelspec's "python" to sys.executable (the venv's)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,  # per cell: a hang guard, not a speed test
        allow_errors=False,  # a failing cell raises CellExecutionError
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute(env=env)  # its run time is a benchmark matter, not asserted here
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    pngs = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(pngs) >= 2, "expected the attack figure and the defender figure"
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if "text" in o)
    assert "tiny encoders: True" in text
    assert "attacked Dice" in text and "removed" in text and "skipping" not in text
    assert (tmp_path / "cache" / "features").is_dir()  # features went to PPD_CACHE, not ~/.cache
