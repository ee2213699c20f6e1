"""Build the bundled sample data ``examples/data/{cvc_clinicdb,ph2}`` from the shared data collection.

Deterministic: stems are taken evenly spaced (index ``floor(i * len / n)``) from the suggested **train**
splits (``<src>/splits/<name>_train.txt``), so the val splits stay held out.

* ``cvc_clinicdb``: 24 pairs; images (384x288 JPEG) and masks (0/255 PNG) copied byte-for-byte.
* ``ph2``: 12 pairs; image Lanczos-resized to long side 384 -> JPEG quality 90; mask nearest-neighbour
  resized to the same size -> thresholded at >= 128 -> single-channel 0/255 PNG.

Each output folder gets ``images/``, ``masks/``, ``manifest.csv`` and ``LICENSE.md`` (the source's terms
and citation, copied, plus what subset and processing this is). All files are written atomically.

Usage::

    python experiments/make_sample_data.py [--src ../shared/data] [--dst examples/data]
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ppd.io import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data"
DEFAULT_DST = REPO / "examples" / "data"

PH2_LONG_SIDE = 384
PH2_JPEG_QUALITY = 90


def evenly_spaced(stems: list[str], n: int) -> list[str]:
    """``n`` stems at indices ``floor(i * len(stems) / n)``, ``i = 0..n-1`` (deterministic)."""
    if n > len(stems):
        raise ValueError(f"asked for {n} stems but the split has only {len(stems)}")
    return [stems[i * len(stems) // n] for i in range(n)]


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {row["stem"]: row for row in csv.DictReader(fh)}


def copy_pair(src: Path, dst: Path, stem: str, row: dict[str, str]) -> tuple[str, str, str]:
    """CVC: copy image and mask bytes unchanged. Returns (image relpath, mask relpath, processing)."""
    image_rel, mask_rel = row["image"], row["mask"]
    atomic_write_bytes(dst / image_rel, (src / image_rel).read_bytes())
    atomic_write_bytes(dst / mask_rel, (src / mask_rel).read_bytes())
    return image_rel, mask_rel, "copied byte-for-byte from the shared collection"


def resize_pair(src: Path, dst: Path, stem: str, row: dict[str, str]) -> tuple[str, str, str]:
    """PH2: downscale to long side 384 (Lanczos image, nearest mask), JPEG q=90 + 0/255 PNG."""
    with Image.open(src / row["image"]) as im:
        image = im.convert("RGB")
    with Image.open(src / row["mask"]) as im:
        mask = im.convert("L")
    w, h = image.size
    if mask.size != (w, h):
        raise ValueError(f"{stem}: image {w}x{h} but mask {mask.size[0]}x{mask.size[1]}")
    scale = PH2_LONG_SIDE / max(w, h)
    size = (round(w * scale), round(h * scale))
    image = image.resize(size, Image.Resampling.LANCZOS)
    m = np.asarray(mask.resize(size, Image.Resampling.NEAREST)) >= 128
    image_rel, mask_rel = f"images/{stem}.jpg", f"masks/{stem}.png"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=PH2_JPEG_QUALITY)
    atomic_write_bytes(dst / image_rel, buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", optimize=True)
    atomic_write_bytes(dst / mask_rel, buf.getvalue())
    proc = (
        f"{w}x{h} -> Lanczos resize to {size[0]}x{size[1]} -> JPEG quality {PH2_JPEG_QUALITY}; "
        "mask: nearest-neighbour resize -> threshold >=128 -> 0/255 PNG"
    )
    return image_rel, mask_rel, proc


SUBSET_NOTE = {
    "cvc_clinicdb": (
        "24 of the 408 frames of the suggested **train** split (`splits/cvc_clinicdb_train.txt`: ids 1–408, "
        "sequences 1–19), every 17th frame (ids {stems}). The val split (ids 409–612) is not included.\n\n"
        "**Processing here:** none; images (384×288 JPEG) and masks (0/255 PNG) are copied byte-for-byte "
        "from the project's shared copy, whose processing is described below."
    ),
    "ph2": (
        "12 of the 140 images of the suggested **train** split (`splits/ph2_train.txt`: IMD002–IMD365, "
        "sorted stems), taken at evenly spaced positions (index ⌊i·140/12⌋: {stems}). The val split "
        "(IMD367–IMD437) is not included.\n\n"
        "**Processing here:** the shared copy (long side 512, see below) was downscaled again to long side "
        f"{PH2_LONG_SIDE} px: image Lanczos → JPEG quality {PH2_JPEG_QUALITY}; mask nearest-neighbour → "
        "thresholded at ≥128 → single-channel 0/255 PNG. Per-file sizes are in `manifest.csv`."
    ),
}


def make_subset(
    name: str,
    n: int,
    src_root: Path,
    dst_root: Path,
    convert: Callable[[Path, Path, str, dict[str, str]], tuple[str, str, str]],
) -> list[str]:
    """Write ``dst_root/name`` from ``src_root/name``; returns the chosen stems."""
    src, dst = src_root / name, dst_root / name
    stems = evenly_spaced(read_lines(src_root / "splits" / f"{name}_train.txt"), n)
    manifest = read_manifest(src / "manifest.csv")
    rows = []
    for stem in stems:
        row = manifest[stem]
        image_rel, mask_rel, proc = convert(src, dst, stem, row)
        rows.append(
            {
                "stem": stem,
                "image": image_rel,
                "mask": mask_rel,
                "split": "train",
                "source": row["source"],
                "version": row["version"],
                "source_image": row["source_image"],
                "source_mask": row["source_mask"],
                "processing": f"{row['processing']}; then (examples/data) {proc}",
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(dst / "manifest.csv", buf.getvalue().encode())
    shared_license = (src / "LICENSE.md").read_text().strip()
    title = shared_license.splitlines()[0].lstrip("# ").strip()
    text = (
        f"# {title} (bundled sample)\n\n"
        f"**This folder:** {SUBSET_NOTE[name].format(stems=', '.join(stems))}\n\n"
        f"Made by `experiments/make_sample_data.py` (deterministic). The same terms of use and citation as "
        f"the full dataset apply; they are copied verbatim below from the project's shared copy "
        f"(`shared/data/{name}/LICENSE.md`), which describes the full collection this sample was drawn "
        f"from.\n\n---\n\n"
        + shared_license.replace("\n# ", "\n## ").replace(f"# {title}", f"## {title}", 1)
        + "\n"
    )
    atomic_write_bytes(dst / "LICENSE.md", text.encode())
    return stems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="shared data folder (default %(default)s)"
    )
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST, help="output folder (default %(default)s)")
    args = parser.parse_args(argv)
    for name, n, convert in (("cvc_clinicdb", 24, copy_pair), ("ph2", 12, resize_pair)):
        stems = make_subset(name, n, args.src, args.dst, convert)
        print(f"{name}: {len(stems)} pairs -> {args.dst / name}")


if __name__ == "__main__":
    main()
