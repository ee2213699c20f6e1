"""``python -m ppd.predict``: refine point prompts with a trained defender and write masks and overlays.

::

    python -m ppd.predict --defender CKPT|pretrained --images DIR|FILE... (--points PTS.json | --reference IMG MASK)
                          --out DIR [--overwrite] [--max-steps N] [--cache-root DIR]

``--defender pretrained`` uses the defender shipped with ppd (``docs/defender.md``), with the inference
settings stored in its file (step rule, feature-matching options) unless ``--max-steps`` overrides them.

Prompts come from a JSON file (``--points``) or from DINOv2 feature matching against a one-shot reference
image and its mask (``--reference``). Points JSON format (stem = image file name without extension)::

    {"<stem>": {"points": [[x, y], ...], "labels": [1, 0, ...]}, ...}

with ``(x, y)`` in pixels of the original image and labels 1 = positive, 0 = negative. Every image needs an
entry. Per image ``<stem>`` the output folder gets

* ``<stem>.json``: ``input_points``/``input_labels`` (as given; for ``--reference`` the matched node
  centres), ``points``/``labels`` (kept prompts, node centres), ``removed``/``removed_labels``, ``steps``,
  ``q_values``, ``stop_reason``, ``image``, ``defender``;
* ``<stem>_mask.png``: the SAM mask of the kept prompts, 0/255;
* ``<stem>_overlay.png``: the image with kept points (green stars positive, red crosses negative), removed
  points (white circles) and the mask contour (yellow), drawn by :func:`ppd.viz.draw_prompts`.

Existing outputs are never replaced unless ``--overwrite`` is given; this is checked for all images
before anything is written, and every file is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ppd.io import atomic_write_bytes

log = logging.getLogger("ppd.predict")


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 ``(H, W)`` or ``(H, W, 3)`` array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from folders (their image files, sorted) and explicit files.

    Raises:
        FileNotFoundError: a path does not exist or a folder holds no image.
        ValueError: two images share a stem (their outputs would collide).
    """
    from ppd.data.datasets import IMAGE_EXTENSIONS

    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"--images folder {p} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--images: {p} does not exist")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise ValueError(
                f"--images: {stems[f.stem]} and {f} share the stem {f.stem!r}; outputs would collide"
            )
        stems[f.stem] = f
    return list(stems.values())


def read_points(path: str | Path, stems: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parse a points JSON (format in the module docstring) and check it covers ``stems``.

    Returns:
        ``{stem: (points (K, 2) float64, labels (K,) int64)}``.

    Raises:
        ValueError: malformed file (names the file and the stem/field).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--points {path}: cannot read JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"--points {path}: expected an object {{stem: {{points, labels}}}}")
    out = {}
    for stem in stems:
        if stem not in data:
            raise ValueError(f"--points {path}: no entry for image {stem!r}")
        e = data[stem]
        if not isinstance(e, dict) or "points" not in e or "labels" not in e:
            raise ValueError(f"--points {path}: entry {stem!r} needs 'points' and 'labels'")
        pts = np.asarray(e["points"], dtype=np.float64)
        lab = np.asarray(e["labels"])
        if pts.size == 0:
            pts = pts.reshape(0, 2)
        if pts.ndim != 2 or pts.shape[1] != 2 or lab.shape != (pts.shape[0],):
            raise ValueError(
                f"--points {path}: entry {stem!r}: expected points [[x, y], ...] and as many labels, got "
                f"points shape {pts.shape} and labels shape {lab.shape}"
            )
        if not np.isin(lab, (0, 1)).all():
            raise ValueError(f"--points {path}: entry {stem!r}: labels must be 1 (positive) or 0 (negative)")
        out[stem] = (pts, lab.astype(np.int64))
    return out


def output_paths(out: Path, stem: str) -> list[Path]:
    """The three output files of one image."""
    return [out / f"{stem}.json", out / f"{stem}_mask.png", out / f"{stem}_overlay.png"]


def overlay_png(image: np.ndarray, mask: np.ndarray, result: Any, title: str) -> bytes:
    """PNG of the overlay figure (kept / removed points, mask contour)."""
    import matplotlib.pyplot as plt

    from ppd.viz import draw_prompts, figure_to_array

    h, w = mask.shape
    fig, ax = plt.subplots(1, 1, figsize=(6, 6 * h / max(w, 1)), dpi=100)
    draw_prompts(ax, image, mask, result.points, result.labels, result.removed, title=title)
    fig.tight_layout()
    return png_bytes(figure_to_array(fig))


def result_json(
    image_path: Path, defender_path: str, in_pts: np.ndarray, in_lab: np.ndarray, r: Any
) -> dict[str, Any]:
    """JSON-serialisable record of one refinement."""
    return {
        "image": str(image_path),
        "defender": str(defender_path),
        "input_points": np.asarray(in_pts, dtype=float).reshape(-1, 2).tolist(),
        "input_labels": np.asarray(in_lab, dtype=int).reshape(-1).tolist(),
        "points": r.points.astype(float).tolist(),
        "labels": r.labels.astype(int).tolist(),
        "removed": r.removed.astype(float).tolist(),
        "removed_labels": r.removed_labels.astype(int).tolist(),
        "steps": int(r.steps),
        "q_values": [float(v) for v in r.q_values],
        "stop_reason": r.stop_reason,
        "mask_pixels": int(r.mask.sum()),
    }


def image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` of an image file, read from its header (the pixels are decoded later).

    Raises:
        ValueError: the file is not a readable image (names the file).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size
    except Exception as err:  # PIL raises many types for a bad file; the user needs the file and reason
        raise ValueError(f"--images: {path} is not a readable image ({type(err).__name__}: {err})") from err


def check_clicks(points: dict[str, tuple[np.ndarray, np.ndarray]], sizes: dict[str, tuple[int, int]]) -> None:
    """Every click lies inside its image (``0 <= x <= W``, ``0 <= y <= H``, finite).

    Raises:
        ValueError: one line naming the image, the click and the image size.
    """
    for stem, (pts, _) in points.items():
        w, h = sizes[stem]
        for x, y in pts.tolist():
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
                raise ValueError(
                    f"--points: click ({x:g}, {y:g}) of image {stem!r} lies outside it (W={w}, H={h})"
                )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ppd.predict", description=__doc__.splitlines()[0])
    p.add_argument(
        "--defender",
        required=True,
        help="'pretrained' (the defender shipped with ppd), an exported defender (.pt) or a PPD training checkpoint",
    )
    p.add_argument("--images", required=True, nargs="+", help="image folder(s) and/or image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--points", help="points JSON {stem: {points: [[x, y], ...], labels: [1, 0, ...]}}")
    src.add_argument(
        "--reference", nargs=2, metavar=("IMG", "MASK"), help="one-shot reference image and mask"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--max-steps", type=int, default=None, help="defender step budget (>= 0)")
    p.add_argument(
        "--allow-removing-last-positive",
        action="store_true",
        help="let the defender remove the last positive prompt (default: it is always kept)",
    )
    p.add_argument("--cache-root", default=None, help="feature cache folder (default $PPD_CACHE/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.max_steps is not None and a.max_steps < 0:
        p.error(f"--max-steps must be >= 0, got {a.max_steps}")
    return a


def main(argv: list[str] | None = None, defender: Any = None) -> int:
    """Entry point; returns the exit code (``defender`` lets tests pass a pre-built one).

    Every input (images, clicks, reference, defender file, existing outputs) is checked before the first
    output is written; a bad one ends in a one-line error and exit code 2 with nothing written.
    """
    from tqdm.auto import tqdm

    from ppd.data.datasets import DatasetError, load_image, load_mask
    from ppd.quiet import quiet_known_warnings

    quiet_known_warnings()
    a = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        images = collect_images(a.images)
        sizes = {f.stem: image_size(f) for f in images}
        out = Path(a.out)
        if not a.overwrite:
            existing = [q for f in images for q in output_paths(out, f.stem) if q.exists()]
            if existing:
                raise FileExistsError(
                    f"{len(existing)} output file(s) already exist (e.g. {existing[0]}); pass --overwrite to replace them"
                )
        points = read_points(a.points, [f.stem for f in images]) if a.points else None
        if points is not None:
            check_clicks(points, sizes)
        if a.reference:
            ref_img, ref_mask = load_image(a.reference[0]), load_mask(a.reference[1])
            if ref_mask.shape != ref_img.shape[:2]:
                raise ValueError(
                    f"--reference: mask {a.reference[1]} size {ref_mask.shape} != image size {ref_img.shape[:2]}"
                )
            if not ref_mask.any():
                raise ValueError(f"--reference: mask {a.reference[1]} is empty")
        if defender is None:
            from ppd.inference import PromptDefender

            try:
                defender = PromptDefender.from_checkpoint(
                    a.defender, max_steps=a.max_steps, cache_root=a.cache_root
                )
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(f"--defender {a.defender}: {err}") from err
        elif a.max_steps is not None:
            defender.max_steps = a.max_steps
    except (FileNotFoundError, FileExistsError, ValueError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    defender.keep_last_positive = not a.allow_removing_last_positive
    ref_feats = defender.features(ref_img) if a.reference else None
    # the feature-matching options the defender was trained with (older files: the function's defaults)
    fm_options = dict(defender.env_config.get("feature_matching") or {})

    for path in tqdm(images, desc="refining", unit="img", disable=a.quiet):
        image = load_image(path)
        if points is not None:
            in_pts, in_lab = points[path.stem]
            r = defender.refine(image, in_pts, in_lab)
        else:
            import torch

            from ppd.env.prompts import prompts_from_reference, status_to_points

            feats = defender.features(image)
            status, _ = prompts_from_reference(
                ref_feats.dino_tokens, ref_mask, feats.dino_tokens, defender.grid, **fm_options
            )
            h, w = feats.original_size
            pts_t, lab_t = status_to_points(status, defender.grid, h, w)
            in_pts, in_lab = pts_t.numpy(), lab_t.numpy()
            r = defender.refine_status(feats, torch.as_tensor(status))
        js, mask_p, ov_p = output_paths(out, path.stem)
        record = result_json(path, a.defender, in_pts, in_lab, r)
        atomic_write_bytes(mask_p, png_bytes(r.mask.astype(np.uint8) * 255))
        atomic_write_bytes(
            ov_p,
            overlay_png(image, r.mask, r, f"{path.stem}: kept {len(r.labels)}, removed {len(r.removed)}"),
        )
        atomic_write_bytes(js, (json.dumps(record, indent=1) + "\n").encode())
    print(f"wrote {len(images)} result(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
