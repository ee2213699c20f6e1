"""Image / binary-mask datasets in three on-disk layouts, loaded lazily as :class:`Sample` objects.

Layouts:

* :class:`SegmentationFolder` -- ``<root>/images/<stem>.(jpg|jpeg|png|bmp|tif|tiff)`` and
  ``<root>/masks/<stem>.png`` with matching stems, optionally restricted by a split (one stem a line).
* :class:`FSS1000` -- the FSS-1000 layout ``<root>/<class>/<N>.jpg`` + ``<root>/<class>/<N>.png``;
  stem ``"<class>/<N>"``.
* :class:`VOCInstances` -- PASCAL VOC ``JPEGImages/<photo>.jpg`` + ``SegmentationObject/<photo>.png``
  (palette PNG of instance ids, 255 = void/border); one binary sample per object instance, stem
  ``"<photo>_<id>"``; void pixels count as background.

Every dataset checks its file index when it is built (missing folders, empty folders, images without
masks and masks without images, unknown split stems) and decodes files only in ``__getitem__``; decoding
problems (corrupt file, image/mask size mismatch) raise :class:`DatasetError` naming the file. A mask that
is not binary (values other than ``{0, 1}`` or ``{0, max}``) is thresholded at 128 and reported with one
``UserWarning`` per dataset object (per worker process when used in a ``DataLoader`` with workers).

The datasets are plain map-style sequences (``len``, integer indexing), usable by
``torch.utils.data.DataLoader`` with a collate function that understands :class:`Sample`.
Images are returned with their stored pixel order: EXIF orientation tags are *not* applied, because the
masks of public datasets are drawn on the stored pixel grid.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "Sample",
    "SegmentationDataset",
    "SegmentationFolder",
    "load_image",
    "load_mask",
    "natural_key",
    "read_split_file",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""Accepted image file extensions (matched case-insensitively)."""

MASK_THRESHOLD = 128
"""Non-binary 8-bit masks are foreground where ``value >= MASK_THRESHOLD``."""

VOC_VOID = 255
"""Value of void / border pixels in VOC ``SegmentationObject`` PNGs (treated as background)."""

PathLike = str | os.PathLike[str]
SplitArg = PathLike | Sequence[str] | None

# Exceptions Pillow raises for unreadable files: UnidentifiedImageError and "image file is truncated" are
# OSError; broken headers can raise SyntaxError/ValueError; huge files raise DecompressionBombError.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


class DatasetError(ValueError):
    """Bad dataset input (missing/corrupt file, unpaired stems, size mismatch, bad split...)."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One image with its binary ground-truth mask.

    Attributes:
        stem: Identifier unique within its dataset (file stem, ``"<class>/<N>"``, ``"<photo>_<id>"``).
        image: ``(H, W, 3)`` ``uint8`` RGB image.
        mask: ``(H, W)`` ``bool`` mask, ``True`` = object.
        image_path: File the image was read from.
        mask_path: File the mask was read from, ``None`` for in-memory samples.
    """

    stem: str
    image: np.ndarray
    mask: np.ndarray
    image_path: Path
    mask_path: Path | None = None

    def __post_init__(self) -> None:
        img, msk = self.image, self.mask
        if not (
            isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        ):
            got = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
            raise DatasetError(f"Sample {self.stem!r}: image must be a (H, W, 3) uint8 array, got {got}")
        if not (isinstance(msk, np.ndarray) and msk.ndim == 2 and msk.dtype == np.bool_):
            got = f"{type(msk).__name__} {getattr(msk, 'shape', '')} {getattr(msk, 'dtype', '')}"
            raise DatasetError(f"Sample {self.stem!r}: mask must be a (H, W) bool array, got {got}")
        if msk.shape != img.shape[:2]:
            raise DatasetError(
                f"Sample {self.stem!r}: mask size (H, W) = {msk.shape} differs from image size {img.shape[:2]}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the image and mask."""
        return int(self.image.shape[0]), int(self.image.shape[1])


# ----------------------------------------------------------------------------------------------------------
# File loading
# ----------------------------------------------------------------------------------------------------------


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open ``path`` with Pillow and force a full decode, turning any failure into a DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # full decode now: truncated files fail here, not later
            return im.copy()
    except _PIL_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a single-channel integer/float array to uint8 (16-bit by /257, others by min-max)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 65535):
        return (arr.astype(np.uint32) // 257).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.round((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Grey-scale images are replicated to 3 channels, alpha is dropped, palette images are expanded,
    16-bit grey images are scaled to 8 bit.

    Args:
        path: Image file (any format Pillow reads).

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB array.

    Raises:
        DatasetError: The file is missing, unreadable or corrupt.
    """
    path = Path(path)
    im = _open_decoded(path, "image")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        grey = _to_uint8(np.asarray(im))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _mask_channel(im: Image.Image) -> np.ndarray:
    """Reduce a mask image of any mode to one 2-D channel (palette -> indices, colour -> max over RGB)."""
    if im.mode == "1":
        return np.asarray(im, dtype=bool).astype(np.uint8)
    if im.mode == "P":
        # Palette masks store class/instance indices; the index (not the display colour) is the label.
        return np.asarray(im)
    if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(im)
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA")
    arr = np.asarray(im)
    colour = arr[:, :, :3].max(axis=2)
    if arr.shape[2] == 4 and colour.min() == colour.max():
        # Colour carries no information (e.g. black RGBA with the shape in alpha): use alpha.
        return arr[:, :, 3]
    return colour


def _binarize(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return ``(mask, was_binary)``; binary means values in ``{0, 1}`` or ``{0, max}`` of the dtype."""
    if values.dtype == np.bool_:
        return values, True
    if values.dtype.kind == "f":
        uniq = np.unique(values)
        if np.all(np.isin(uniq, (0.0, 1.0))):
            return values > 0, True
        return _to_uint8(values) >= MASK_THRESHOLD, False
    uniq = np.unique(values)
    full = 65535 if values.dtype == np.uint16 or uniq.max(initial=0) > 255 else 255
    if np.all(np.isin(uniq, (0, 1))) or np.all(np.isin(uniq, (0, full))):
        return values > 0, True
    return _to_uint8(values) >= MASK_THRESHOLD, False


def _read_mask(path: Path, expected_size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """Load a mask; returns ``(mask (H, W) bool, was_binary)``. Size check against ``expected_size``."""
    im = _open_decoded(path, "mask")
    mask, was_binary = _binarize(_mask_channel(im))
    if expected_size is not None and tuple(mask.shape) != tuple(expected_size):
        raise DatasetError(
            f"mask {path} has size (H, W) = {tuple(mask.shape)}, expected {tuple(expected_size)}"
        )
    return np.ascontiguousarray(mask, dtype=bool), was_binary


def load_mask(path: PathLike, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask file.

    Single-channel masks with values in ``{0, 1}`` or ``{0, 255}`` (``{0, 65535}`` for 16 bit) are used as
    they are (non-zero = object). Palette PNGs are read as indices, colour masks as the maximum over the
    RGB channels (alpha if the colour is constant). Any other value set is thresholded at 128 (8-bit
    scale) and a ``UserWarning`` is emitted.

    Args:
        path: Mask file (PNG recommended; lossy formats produce non-binary masks).
        expected_size: ``(H, W)`` the mask must have (e.g. the image's), or ``None`` to skip the check.

    Returns:
        ``(H, W)`` ``bool`` mask, ``True`` = object.

    Raises:
        DatasetError: The file is missing, unreadable, or its size differs from ``expected_size``.
    """
    path = Path(path)
    mask, was_binary = _read_mask(path, expected_size)
    if not was_binary:
        warnings.warn(
            f"mask {path} is not binary; thresholded at {MASK_THRESHOLD}", UserWarning, stacklevel=2
        )
    return mask


def natural_key(stem: str) -> tuple[Any, ...]:
    """Sort key ordering digit runs numerically: ``"2" < "10"``, ``"IMD002" < "IMD010"``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", stem) if t)


def read_split_file(path: PathLike) -> list[str]:
    """Read a split file: one stem a line; blank lines and ``#`` comments ignored, whitespace stripped.

    Raises:
        DatasetError: The file is missing/unreadable, empty, or lists a stem twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split file {path}: {exc}") from exc
    stems = [s for s in (ln.split("#", 1)[0].strip() for ln in text.splitlines()) if s]
    if not stems:
        raise DatasetError(f"split file {path} lists no stems (expected one stem a line)")
    return stems


def _fmt_list(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(s) for s in items[:limit])
    return f"{shown}, ... ({len(items)} in total)" if len(items) > limit else shown


def _list_files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Map stem -> file for the files in ``folder`` (not recursive, hidden files ignored).

    Raises:
        DatasetError: Two files share a stem (e.g. ``a.jpg`` and ``a.png``).
    """
    found: dict[str, Path] = {}
    exts = {e.lower() for e in extensions}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in exts or not p.is_file():
            continue
        if p.stem in found:
            raise DatasetError(
                f"ambiguous stem {p.stem!r} in {folder}: both {found[p.stem].name} and {p.name}"
            )
        found[p.stem] = p
    return found


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"{what} is not a directory: {path}")


def _apply_split(available: Sequence[str], split: Sequence[str], source: str) -> list[str]:
    """Order/restrict ``available`` stems by ``split``; unknown or repeated stems raise DatasetError."""
    counts: dict[str, int] = {}
    for s in split:
        counts[s] = counts.get(s, 0) + 1
    dupes = [s for s, c in counts.items() if c > 1]
    if dupes:
        raise DatasetError(f"split {source} lists stems more than once: {_fmt_list(sorted(set(dupes)))}")
    known = set(available)
    unknown = [s for s in split if s not in known]
    if unknown:
        raise DatasetError(f"split {source} names stems that are not in the dataset: {_fmt_list(unknown)}")
    return list(split)


def _resolve_split(split: SplitArg, root: Path) -> tuple[list[str], str] | None:
    """Turn a split argument into ``(stems, description)``; a str/Path is a file (tried as given, then
    relative to ``root``)."""
    if split is None:
        return None
    if isinstance(split, (str, os.PathLike)):
        p = Path(split)
        if not p.is_file() and not p.is_absolute() and (root / p).is_file():
            p = root / p
        return read_split_file(p), f"file {p}"
    stems = [str(s) for s in split]
    if not stems:
        raise DatasetError("split list is empty (expected at least one stem)")
    return stems, "list"


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    stem: str
    image_path: Path
    mask_path: Path
    instance_id: int | None = None  # VOC: the id in the SegmentationObject PNG


@dataclass
class _WarnOnce:
    warned: bool = False
    first: Path | None = field(default=None)


class SegmentationDataset(Sequence[Sample]):
    """Base class: an index of ``(stem, image file, mask file)`` entries decoded on access.

    Subclasses fill ``self._entries`` in ``__init__``; ``__getitem__`` loads the image and mask, checks
    their sizes, and warns once per dataset object about non-binary masks.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        _require_dir(self.root, f"{type(self).__name__} root")
        self._entries: list[_Entry] = []
        self._nonbinary = _WarnOnce()

    # -- sequence protocol ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(index).__name__}")
        n = len(self._entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return self._load(self._entries[int(index)])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)})"

    # -- public helpers ------------------------------------------------------------------------------
    @property
    def stems(self) -> list[str]:
        """Stems in dataset order (a copy)."""
        return [e.stem for e in self._entries]

    def index(self, stem: str) -> int:  # type: ignore[override]
        """Position of ``stem``; raises ``KeyError`` naming the dataset if absent."""
        for i, e in enumerate(self._entries):
            if e.stem == stem:
                return i
        raise KeyError(f"stem {stem!r} is not in {self!r}")

    def image_path(self, index: int) -> Path:
        """Image file of entry ``index`` without decoding it."""
        return self._entries[index].image_path

    def verify(self) -> None:
        """Decode every sample once (raises the first :class:`DatasetError`); useful before long runs."""
        for i in range(len(self)):
            self[i]

    # -- loading -------------------------------------------------------------------------------------
    def _load_mask_values(self, entry: _Entry, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
        return _read_mask(entry.mask_path, None)

    def _load(self, entry: _Entry) -> Sample:
        image = load_image(entry.image_path)
        size = (int(image.shape[0]), int(image.shape[1]))
        mask, was_binary = self._load_mask_values(entry, size)
        if mask.shape != size:
            raise DatasetError(
                f"size mismatch for stem {entry.stem!r}: image {entry.image_path} is "
                f"{size[1]}x{size[0]} (WxH) but mask {entry.mask_path} is {mask.shape[1]}x{mask.shape[0]}"
            )
        if not was_binary and not self._nonbinary.warned:
            self._nonbinary.warned = True
            self._nonbinary.first = entry.mask_path
            warnings.warn(
                f"{type(self).__name__} at {self.root}: mask {entry.mask_path} is not binary "
                f"(values other than 0/1 or 0/255); thresholding non-binary masks at {MASK_THRESHOLD}. "
                "This warning is shown once per dataset.",
                UserWarning,
                stacklevel=3,
            )
        return Sample(entry.stem, image, mask, entry.image_path, entry.mask_path)


def _pair_up(
    images: dict[str, Path], masks: dict[str, Path], where: str, mask_dir: Path | None = None
) -> list[str]:
    """Stems present in both maps; raises DatasetError naming unpaired stems on either side.

    ``mask_dir`` (folder layout only) is searched for same-stem non-PNG masks to give a hint.
    """
    no_mask = sorted(set(images) - set(masks), key=natural_key)
    no_image = sorted(set(masks) - set(images), key=natural_key)
    problems = []
    if no_mask:
        where_png = f"{mask_dir}/<stem>.png" if mask_dir is not None else "<stem>.png beside the image"
        msg = f"images without a mask (expected {where_png}): {_fmt_list(no_mask)}"
        wrong_ext = sorted(
            p.name
            for p in (mask_dir.iterdir() if mask_dir is not None else ())
            if p.stem in set(no_mask) and p.suffix.lower() in IMAGE_EXTENSIONS and p.suffix.lower() != ".png"
        )
        if wrong_ext:
            msg += f" (found non-PNG masks {_fmt_list(wrong_ext)}: masks must be lossless PNG)"
        problems.append(msg)
    if no_image:
        problems.append(f"masks without an image: {_fmt_list(no_image)}")
    if problems:
        raise DatasetError(f"{where}: " + "; ".join(problems))
    return sorted(images, key=natural_key)


class SegmentationFolder(SegmentationDataset):
    """``<root>/<image_dir>/<stem>.<ext>`` + ``<root>/<mask_dir>/<stem>.png`` pairs.

    Args:
        root: Dataset folder.
        split: ``None`` (all stems, natural sort order), a split file (one stem a line; a relative path
            is tried as given, then relative to ``root``), or a list of stems. A split keeps its order.
        image_dir: Image sub-folder name.
        mask_dir: Mask sub-folder name.

    Raises:
        DatasetError: Missing root or sub-folder, no images, unpaired stems, ambiguous stems
            (``a.jpg`` + ``a.png``), split naming unknown or repeated stems.
    """

    def __init__(
        self,
        root: PathLike,
        split: SplitArg = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
    ) -> None:
        super().__init__(root)
        img_dir, msk_dir = self.root / image_dir, self.root / mask_dir
        _require_dir(img_dir, "image folder")
        _require_dir(msk_dir, "mask folder")
        images = _list_files(img_dir, IMAGE_EXTENSIONS)
        masks = _list_files(msk_dir, (".png",))
        if not images and not masks:
            raise DatasetError(
                f"empty dataset: no images ({'/'.join(IMAGE_EXTENSIONS)}) in {img_dir} and no PNG masks in {msk_dir}"
            )
        if not images:
            raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {img_dir}")
        stems = _pair_up(images, masks, str(self.root), msk_dir)
        resolved = _resolve_split(split, self.root)
        if resolved is not None:
            stems = _apply_split(stems, resolved[0], resolved[1])
        self._entries = [_Entry(s, images[s], masks[s]) for s in stems]
