"""Per-(method, data set) result cache: JSON files keyed by everything a method's results depend on.

The key of a method is derived from its registry declaration (:class:`ppd.eval.registry.Method`): the
data set block, the graph/encoder set-up, the seed, the config fields it lists in ``config``, its
``method_options`` block, the one-shot reference when it ``needs`` one, the sha256 of every file it needs
(defender with its step budget and last-positive rule, attacker, trained checkpoint) and, recursively, the
keys of the methods it ``uses``. Changing any of these gives a new file; nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ppd.eval.registry import Method, get_method
from ppd.io import atomic_write_text, sha256_file

CACHE_VERSION = "ppd-eval-v2"


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 (first 16 hex) of a file, ``None`` for no file."""
    return None if path is None else sha256_file(path)[:16]


def status_code(status: torch.Tensor) -> str:
    """Compact string of a ``(N,)`` status (one digit per node) for the JSON cache."""
    return "".join(str(int(v)) for v in status.tolist())


def status_from_code(code: str) -> torch.Tensor:
    """Inverse of :func:`status_code`."""
    return torch.tensor([int(c) for c in code], dtype=torch.long)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def method_key_parts(
    method: Method, cfg: Any, facts: dict[str, Any], reference: str | None
) -> dict[str, Any]:
    """What ``method``'s per-image results depend on, beyond the data set, set-up and seed.

    Args:
        method: the declaration.
        cfg: the eval config.
        facts: ``{"defender": {...}, "attacker": digest, "checkpoints": {row: digest}}`` of the run.
        reference: the data set's reference stem.
    """
    parts: dict[str, Any] = {"method": method.name, "output": method.output}
    for key in method.config:
        parts[key] = getattr(cfg, key)
    opts = (cfg.method_options or {}).get(method.name)
    if opts:
        parts["options"] = opts
    for need in method.needs:
        if need == "reference":
            parts["reference"] = reference
        elif need == "checkpoint":
            parts["checkpoint"] = facts["checkpoints"].get(method.name)
        else:
            parts[need] = facts[need]
    parts["uses"] = {u: method_key_parts(get_method(u), cfg, facts, reference) for u in method.uses}
    return parts


class ResultCache:
    """JSON files ``output_dir/cache/<method>__<dataset>__<hash>.json`` with per-image records.

    Args:
        root: the cache folder.
        base: key parts common to every method of a run (data set block, env set-up, seed, version).
    """

    def __init__(self, root: Path, base: dict[str, Any]) -> None:
        self.root = Path(root)
        self.base = base

    def key(self, parts: dict[str, Any]) -> str:
        blob = json.dumps({"version": CACHE_VERSION, **self.base, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def path(self, method: str, dataset: str, parts: dict[str, Any]) -> Path:
        return self.root / f"{_safe(method)}__{_safe(dataset)}__{self.key(parts)}.json"

    def load(self, path: Path) -> dict[str, dict[str, Any]]:
        """Records of a cache file (``{}`` when absent)."""
        return json.loads(path.read_text())["records"] if path.is_file() else {}

    def store(self, path: Path, header: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
        """Merge ``records`` into the file's (other stems stay, e.g. from a run without ``--limit``)."""
        merged = {**self.load(path), **records}
        atomic_write_text(path, json.dumps({**header, "records": merged}, indent=1))


def dataset_block(ds: Any) -> dict[str, Any]:
    """The data set fields that select images (name and reference rule excluded)."""
    return {k: v for k, v in asdict(ds).items() if k not in ("name", "reference")}
