"""Dataset layouts beyond the plain folder: FSS-1000 (class folders) and VOC instances; ``build_dataset``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ppd.data.datasets import (
    IMAGE_EXTENSIONS,
    VOC_VOID,
    DatasetError,
    PathLike,
    SegmentationDataset,
    SegmentationFolder,
    SplitArg,
    _apply_split,
    _Entry,
    _fmt_list,
    _list_files,
    _open_decoded,
    _pair_up,
    _require_dir,
    _resolve_split,
    natural_key,
    read_split_file,
)

__all__ = ["FSS1000", "VOCInstances", "build_dataset"]


class FSS1000(SegmentationDataset):
    """FSS-1000 layout: ``<root>/<class>/<N>.jpg`` images with ``<root>/<class>/<N>.png`` masks.

    Stems are ``"<class>/<N>"``; entries are ordered by class, then naturally by ``N``.

    Args:
        root: Folder holding one sub-folder per class.
        classes: ``None`` for every class folder, a list of class names, or a text file of class names
            (one a line, e.g. FSS-1000's test-class list).

    Raises:
        DatasetError: Missing root, no class folders, unknown class, empty class folder, unpaired files.
    """

    def __init__(self, root: PathLike, classes: PathLike | Sequence[str] | None = None) -> None:
        super().__init__(root)
        available = sorted(
            (p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=natural_key,
        )
        if not available:
            raise DatasetError(
                f"no class folders in FSS-1000 root {self.root} (expected <root>/<class>/<N>.jpg)"
            )
        if classes is None:
            chosen = available
        else:
            if isinstance(classes, (str, os.PathLike)):
                wanted = read_split_file(classes)
            else:
                wanted = [str(c) for c in classes]
            if not wanted:
                raise DatasetError("classes list is empty (expected at least one class name)")
            missing = [c for c in wanted if c not in set(available)]
            if missing:
                raise DatasetError(f"FSS-1000 classes not found under {self.root}: {_fmt_list(missing)}")
            chosen = list(dict.fromkeys(wanted))
        self.classes: list[str] = chosen
        for cls in chosen:
            cdir = self.root / cls
            images = _list_files(cdir, tuple(e for e in IMAGE_EXTENSIONS if e != ".png"))
            masks = _list_files(cdir, (".png",))
            if not images:
                raise DatasetError(f"FSS-1000 class folder {cdir} has no images (expected <N>.jpg + <N>.png)")
            stems = _pair_up(images, masks, str(cdir))
            self._entries.extend(_Entry(f"{cls}/{s}", images[s], masks[s]) for s in stems)

    def class_of(self, index: int) -> str:
        """Class name of entry ``index``."""
        return self._entries[index].stem.split("/", 1)[0]


class VOCInstances(SegmentationDataset):
    """PASCAL VOC instances: one binary sample per object of ``SegmentationObject/<photo>.png``.

    The object PNG is a palette (or single-channel) PNG of instance ids: 0 = background, 255 = void /
    border (background here), ``1..254`` = instances. Stems are ``"<photo>_<id>"`` in photo order, then
    id order. Building the index reads every object PNG of the split once (to list instance ids);
    images are decoded lazily.

    Args:
        root: VOC folder holding ``JPEGImages/`` and ``SegmentationObject/`` (e.g. ``VOC2012``).
        split: ``None`` (every photo with an object PNG), a split name such as ``"train"``/``"val"``
            (read from ``ImageSets/Segmentation/<name>.txt``), a split file path, or a list of photo ids.
        min_pixels: Instances with fewer pixels are skipped (0 keeps all).

    Raises:
        DatasetError: Missing folders, no object PNGs, object PNG without photo, unknown photos in the
            split, object PNG that is not a single-channel id map, or no instance at all.
    """

    def __init__(self, root: PathLike, split: SplitArg = None, min_pixels: int = 0) -> None:
        super().__init__(root)
        img_dir, obj_dir = self.root / "JPEGImages", self.root / "SegmentationObject"
        _require_dir(img_dir, "VOC image folder")
        _require_dir(obj_dir, "VOC SegmentationObject folder")
        objects = _list_files(obj_dir, (".png",))
        if not objects:
            raise DatasetError(f"no instance PNGs in {obj_dir} (expected SegmentationObject/<photo>.png)")
        images = _list_files(img_dir, IMAGE_EXTENSIONS)
        no_image = sorted(set(objects) - set(images), key=natural_key)
        if no_image:
            raise DatasetError(
                f"{obj_dir}: instance masks without a photo in {img_dir}: {_fmt_list(no_image)}"
            )
        photos = sorted(objects, key=natural_key)  # photos without annotation are normal in VOC: ignored
        if isinstance(split, str) and not split.endswith(".txt") and "/" not in split and os.sep not in split:
            split = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        resolved = _resolve_split(split, self.root)
        if resolved is not None:
            photos = _apply_split(photos, resolved[0], resolved[1])
        for photo in photos:
            ids = self._instance_ids(objects[photo], min_pixels)
            self._entries.extend(_Entry(f"{photo}_{i}", images[photo], objects[photo], i) for i in ids)
        if not self._entries:
            raise DatasetError(f"no object instances (ids 1..254) in the instance PNGs of {obj_dir}")

    @staticmethod
    def _id_map(path: Path) -> np.ndarray:
        im = _open_decoded(path, "VOC instance mask")
        if im.mode not in ("P", "L"):
            raise DatasetError(
                f"VOC instance mask {path} has mode {im.mode}; expected a palette (P) or single-channel (L) "
                "PNG of instance ids"
            )
        return np.asarray(im)

    def _instance_ids(self, path: Path, min_pixels: int) -> list[int]:
        ids, counts = np.unique(self._id_map(path), return_counts=True)
        return [int(i) for i, c in zip(ids, counts, strict=True) if 0 < i < VOC_VOID and c >= min_pixels]

    def _load_mask_values(self, entry: _Entry, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
        return self._id_map(entry.mask_path) == entry.instance_id, True

    def instance_id(self, index: int) -> int:
        """Instance id (value in the object PNG) of entry ``index``."""
        iid = self._entries[index].instance_id
        assert iid is not None
        return iid

    def class_id(self, index: int) -> int | None:
        """VOC class id of entry ``index`` (majority of ``SegmentationClass`` over the instance), or
        ``None`` when ``SegmentationClass/<photo>.png`` is absent."""
        entry = self._entries[index]
        cls_path = self.root / "SegmentationClass" / entry.mask_path.name
        if not cls_path.is_file():
            return None
        inst = self._id_map(entry.mask_path) == entry.instance_id
        cls = self._id_map(cls_path)
        if cls.shape != inst.shape:
            raise DatasetError(f"size mismatch: {cls_path} is {cls.shape}, {entry.mask_path} is {inst.shape}")
        vals, counts = np.unique(cls[inst], return_counts=True)
        keep = (vals > 0) & (vals < VOC_VOID)
        return int(vals[keep][np.argmax(counts[keep])]) if keep.any() else None


_KINDS: dict[str, type[SegmentationDataset]] = {
    "folder": SegmentationFolder,
    "fss1000": FSS1000,
    "voc": VOCInstances,
}


def build_dataset(kind: str, root: PathLike, **kwargs: Any) -> SegmentationDataset:
    """Build a dataset by layout name.

    Args:
        kind: ``"folder"`` (:class:`SegmentationFolder`), ``"fss1000"`` (:class:`FSS1000`) or ``"voc"``
            (:class:`VOCInstances`).
        root: Dataset root folder.
        **kwargs: Passed to the dataset class (e.g. ``split=``, ``classes=``).

    Raises:
        DatasetError: Unknown ``kind`` (or any error of the dataset class).
    """
    key = kind.lower().replace("-", "").replace("_", "")
    if key not in _KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[key](root, **kwargs)
