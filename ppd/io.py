"""Atomic file writes: the project's one implementation (weights, feature cache, exports, reports, CLIs).

Every writer goes through :func:`atomic_path`: the data goes to a temporary file beside the destination,
which is renamed onto it with ``os.replace`` (atomic on POSIX) only when writing succeeded. A crash or an
exception mid-write never leaves a partial destination, nor the temporary file, behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on normal exit move it onto ``dest``.

    Args:
        dest: final file path (its folder is created).
        mode: permission bits of the final file (``mkstemp`` creates ``0600``).

    Yields:
        The temporary path to write to.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically, fsync'ed before the rename (cache entries survive a crash)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights, defender files, eval cache keys)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
