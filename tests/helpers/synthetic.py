"""Tiny deterministic synthetic segmentation data for tests (no dependency on ``../shared``).

Each image is a textured background (smooth colour gradient + stripes + seeded noise) with one or more
filled ellipses of a distinct colour/texture; the mask is the ellipse. Default size 64x48 (W x H).
Everything is a pure function of the seed, so tests are reproducible.

Writers:
    :func:`write_folder_dataset`   ``<root>/images/<stem>.png`` + ``<root>/masks/<stem>.png``
    :func:`write_fss1000_dataset`  ``<root>/<class>/<N>.jpg`` + ``<root>/<class>/<N>.png``
    :func:`write_voc_dataset`      ``JPEGImages/``, ``SegmentationObject/`` (palette, 255 border),
                                   ``SegmentationClass/``, ``ImageSets/Segmentation/{train,val}.txt``
In memory:
    :func:`synthetic_pair`, :func:`make_samples`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ppd.data.datasets import Sample

WIDTH, HEIGHT = 64, 48


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``(H, W, 3)`` float32 textured background in [0, 255]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 140, size=3).astype(np.float32)
    slope = rng.uniform(-0.8, 0.8, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    period = rng.uniform(5, 11)
    angle = rng.uniform(0, np.pi)
    stripes = 12.0 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img += stripes[..., None]
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return img


def _ellipse(
    rng: np.random.Generator, height: int, width: int, scale: float = 1.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Random rotated ellipse mask ``(H, W)`` bool and its centre ``(x, y)``; never touches the border."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = rng.uniform(0.15, 0.3) * width * scale
    b = rng.uniform(0.15, 0.3) * height * scale
    cx = rng.uniform(a + 2, width - a - 2)
    cy = rng.uniform(b + 2, height - b - 2)
    t = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    m = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return m, (float(cx), float(cy))


def synthetic_pair(seed: int, width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """One image with one ellipse object.

    Args:
        seed: RNG seed (same seed -> identical output).
        width: Image width W.
        height: Image height H.

    Returns:
        ``image`` ``(H, W, 3)`` uint8 RGB and ``mask`` ``(H, W)`` bool (non-empty).
    """
    rng = np.random.default_rng(seed)
    img = _background(rng, height, width)
    mask, _ = _ellipse(rng, height, width)
    obj_colour = rng.uniform(150, 240, size=3).astype(np.float32)
    obj = obj_colour + rng.normal(0, 10, size=img.shape).astype(np.float32)
    img = np.where(mask[..., None], obj, img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def make_samples(n: int = 4, seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> list[Sample]:
    """``n`` in-memory samples with stems ``"syn_000"``, ... (``mask_path`` None, fake ``image_path``)."""
    out = []
    for i in range(n):
        image, mask = synthetic_pair(seed * 1000 + i, width, height)
        stem = f"syn_{i:03d}"
        out.append(Sample(stem, image, mask, Path(f"<memory>/{stem}.png"), None))
    return out


def _save(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def write_folder_dataset(
    root: Path,
    n: int = 4,
    seed: int = 0,
    image_ext: str = ".png",
    width: int = WIDTH,
    height: int = HEIGHT,
    split: Sequence[str] | None = None,
) -> Path:
    """Write ``<root>/images/<stem><image_ext>`` + ``<root>/masks/<stem>.png`` (0/255), stems ``"0".."n-1"``.

    Args:
        root: Target folder (created).
        n: Number of pairs.
        seed: Base seed.
        image_ext: ``.png`` (lossless, exact round trip) or ``.jpg``.
        width: Image width W.
        height: Image height H.
        split: If given, also write ``<root>/split.txt`` with these stems.

    Returns:
        ``root``.
    """
    root = Path(root)
    for i in range(n):
        image, mask = synthetic_pair(seed * 1000 + i, width, height)
        _save(image, root / "images" / f"{i}{image_ext}")
        _save(mask.astype(np.uint8) * 255, root / "masks" / f"{i}.png")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if split is not None:
        (root / "split.txt").write_text("".join(f"{s}\n" for s in split))
    return root


def write_fss1000_dataset(
    root: Path, classes: Sequence[str] = ("cat", "dog"), n_per_class: int = 3, seed: int = 0
) -> Path:
    """Write the FSS-1000 layout ``<root>/<class>/<N>.jpg`` + ``<N>.png`` (N = 1..n_per_class).

    Masks are 3-channel 0/255 PNGs like FSS-1000's own labels. Returns ``root``.
    """
    root = Path(root)
    for c, cls in enumerate(classes):
        for n in range(1, n_per_class + 1):
            image, mask = synthetic_pair(seed * 1000 + 100 * c + n)
            _save(image, root / cls / f"{n}.jpg", quality=95)
            rgb_mask = np.repeat(mask.astype(np.uint8)[..., None] * 255, 3, axis=2)
            _save(rgb_mask, root / cls / f"{n}.png")
    return root


def _voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (bit-interleaved), 256 RGB entries flattened."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_voc_dataset(
    root: Path,
    instances_per_photo: Sequence[int] = (2, 1, 3),
    seed: int = 0,
    val_photos: int = 1,
) -> tuple[Path, dict[str, dict[int, np.ndarray]]]:
    """Write a tiny PASCAL VOC tree with instance masks.

    Photo ``k`` is ``"2000_00000k"`` with ``instances_per_photo[k]`` non-overlapping-by-construction
    (later objects drawn on top) ellipses, instance ids ``1..m``, a 1-px void border (255) around each
    object as in VOC, class ids ``(id % 20) + 1``. The last ``val_photos`` photos go to ``val.txt``, the
    others to ``train.txt``. One extra photo without annotation is written to ``JPEGImages`` (as in real
    VOC, where most photos have no segmentation).

    Returns:
        ``(root, truth)`` with ``truth[photo][id]`` = ``(H, W)`` bool mask of each instance still visible
        after occlusion (void pixels excluded), the expected loader output.
    """
    root = Path(root)
    palette = _voc_palette()
    truth: dict[str, dict[int, np.ndarray]] = {}
    photos = []
    for k, m in enumerate(instances_per_photo):
        photo = f"2000_{k:06d}"
        photos.append(photo)
        rng = np.random.default_rng(seed * 1000 + k)
        img = _background(rng, HEIGHT, WIDTH)
        ids = np.zeros((HEIGHT, WIDTH), np.uint8)
        for inst in range(1, m + 1):
            ell, _ = _ellipse(rng, HEIGHT, WIDTH, scale=0.7)
            img = np.where(ell[..., None], rng.uniform(150, 240, size=3).astype(np.float32), img)
            ids[ell] = inst
        # void border: pixels of an object adjacent to a different label
        pad = np.pad(ids, 1, mode="edge")
        border = np.zeros_like(ids, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            border |= pad[dy : dy + HEIGHT, dx : dx + WIDTH] != ids
        border &= ids > 0
        obj = np.where(border, 255, ids).astype(np.uint8)
        cls = np.where(obj == 255, 255, np.where(obj > 0, (obj.astype(np.int32) % 20) + 1, 0)).astype(
            np.uint8
        )
        truth[photo] = {i: obj == i for i in range(1, m + 1) if (obj == i).any()}
        _save(
            np.clip(np.round(img), 0, 255).astype(np.uint8), root / "JPEGImages" / f"{photo}.jpg", quality=95
        )
        for sub, arr in (("SegmentationObject", obj), ("SegmentationClass", cls)):
            pimg = Image.frombytes("P", (WIDTH, HEIGHT), arr.tobytes())  # raw ids as palette indices
            pimg.putpalette(palette)
            (root / sub).mkdir(parents=True, exist_ok=True)
            pimg.save(root / sub / f"{photo}.png")
    unannotated, _ = synthetic_pair(seed * 1000 + 999)
    _save(unannotated, root / "JPEGImages" / "2000_999999.jpg", quality=95)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    n_train = len(photos) - val_photos
    (sets / "train.txt").write_text("".join(f"{p}\n" for p in photos[:n_train]))
    (sets / "val.txt").write_text("".join(f"{p}\n" for p in photos[n_train:]))
    return root, truth
