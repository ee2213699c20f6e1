"""Tests for ppd.data.datasets: layouts, splits, bad input, the warn-once rule, bundled examples."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppd.data import (
    FSS1000,
    DatasetError,
    Sample,
    SegmentationFolder,
    VOCInstances,
    build_dataset,
    load_image,
    load_mask,
)
from ppd.data.datasets import natural_key
from tests.helpers.synthetic import (
    HEIGHT,
    WIDTH,
    make_samples,
    synthetic_pair,
    write_folder_dataset,
    write_fss1000_dataset,
    write_voc_dataset,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def _save(arr: np.ndarray, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


# ----------------------------------------------------------------------------------------------------------
# Sample, load_image, load_mask
# ----------------------------------------------------------------------------------------------------------


def test_sample_validates_shapes() -> None:
    img, mask = synthetic_pair(0)
    s = Sample("a", img, mask, Path("a.png"))
    assert s.size == (HEIGHT, WIDTH) and s.mask_path is None
    with pytest.raises(DatasetError, match="image must be a"):
        Sample("a", img.astype(np.float32), mask, Path("a.png"))
    with pytest.raises(DatasetError, match="mask must be a"):
        Sample("a", img, mask.astype(np.uint8), Path("a.png"))
    with pytest.raises(DatasetError, match="differs from image size"):
        Sample("a", img, mask[:-1], Path("a.png"))


def test_load_image_modes(tmp_path: Path) -> None:
    img, _ = synthetic_pair(1)
    rgb = load_image(_save(img, tmp_path / "rgb.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (HEIGHT, WIDTH, 3) and np.array_equal(rgb, img)
    grey = load_image(_save(img[..., 0], tmp_path / "grey.png"))
    assert grey.shape == (HEIGHT, WIDTH, 3) and np.array_equal(grey[..., 2], img[..., 0])
    rgba = np.concatenate([img, np.full((HEIGHT, WIDTH, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(load_image(_save(rgba, tmp_path / "rgba.png")), img)
    g16 = img[..., 0].astype(np.uint16) * 257
    assert np.array_equal(load_image(_save(g16, tmp_path / "g16.png"))[..., 1], img[..., 0])
    jpg = load_image(_save(img, tmp_path / "x.jpg", quality=95))
    assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 8


def test_load_image_missing_corrupt_truncated(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"image file not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=r"cannot read image .*bad\.jpg"):
        load_image(bad)
    img, _ = synthetic_pair(2)
    full = _save(img, tmp_path / "full.jpg", quality=95).read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match=r"cannot read image .*trunc\.jpg"):
        load_image(trunc)


@pytest.mark.parametrize(
    "encode",
    [
        lambda m: Image.fromarray(m.astype(np.uint8) * 255),  # L 0/255
        lambda m: Image.fromarray(m.astype(np.uint8)),  # L 0/1
        lambda m: Image.fromarray(m),  # mode "1"
        lambda m: Image.fromarray(np.repeat(m.astype(np.uint8)[..., None] * 255, 3, 2)),  # RGB 0/255
        lambda m: Image.fromarray(
            np.dstack([np.zeros((*m.shape, 3), np.uint8), m.astype(np.uint8) * 255])
        ),  # alpha
        lambda m: Image.fromarray(m.astype(np.uint16) * 65535),  # 16-bit 0/65535
    ],
    ids=["L255", "L01", "mode1", "RGB", "RGBA-alpha", "I16"],
)
def test_load_mask_binary_encodings(tmp_path: Path, encode) -> None:
    _, mask = synthetic_pair(3)
    path = tmp_path / "m.png"
    encode(mask).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # binary masks must not warn
        out = load_mask(path, expected_size=mask.shape)
    assert out.dtype == np.bool_ and np.array_equal(out, mask)


def test_load_mask_palette_uses_indices(tmp_path: Path) -> None:
    _, mask = synthetic_pair(4)
    im = Image.frombytes("P", (WIDTH, HEIGHT), mask.astype(np.uint8).tobytes())
    im.putpalette([0, 0, 0, 10, 10, 10] + [0] * (254 * 3))  # index 1 displays almost black
    im.save(tmp_path / "p.png")
    assert np.array_equal(load_mask(tmp_path / "p.png"), mask)


def test_load_mask_nonbinary_thresholds_and_warns(tmp_path: Path) -> None:
    vals = np.array([[0, 127, 128, 200, 255, 30]], np.uint8)
    path = _save(vals, tmp_path / "soft.png")
    with pytest.warns(UserWarning, match=r"soft\.png is not binary"):
        out = load_mask(path)
    assert out.tolist() == [[False, False, True, True, True, False]]


def test_load_mask_errors(tmp_path: Path) -> None:
    path = _save(np.zeros((4, 6), np.uint8), tmp_path / "m.png")
    with pytest.raises(DatasetError, match=re.escape(r"has size (H, W) = (4, 6), expected (5, 6)")):
        load_mask(path, expected_size=(5, 6))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"cannot read mask .*bad\.png"):
        load_mask(bad)
    with pytest.raises(DatasetError, match="mask file not found"):
        load_mask(tmp_path / "missing.png")


def test_natural_key_orders_numbers() -> None:
    assert sorted(["10", "2", "1", "IMD010", "IMD002"], key=natural_key) == [
        "1",
        "2",
        "10",
        "IMD002",
        "IMD010",
    ]


# ----------------------------------------------------------------------------------------------------------
# SegmentationFolder
# ----------------------------------------------------------------------------------------------------------


def test_folder_roundtrip_and_order(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=12, seed=5)
    ds = SegmentationFolder(root)
    assert len(ds) == 12
    assert ds.stems == [str(i) for i in range(12)]  # natural order: 2 before 10
    for i in (0, 11, -1):
        s = ds[i]
        img, mask = synthetic_pair(5 * 1000 + int(s.stem))
        assert np.array_equal(s.image, img) and np.array_equal(s.mask, mask)
        assert (
            s.image_path == root / "images" / f"{s.stem}.png"
            and s.mask_path == root / "masks" / f"{s.stem}.png"
        )
    assert ds.index("7") == 7 and ds.image_path(3).name == "3.png"
    assert [s.stem for s in ds] == ds.stems
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(KeyError, match="'nope'"):
        ds.index("nope")


def test_folder_accepts_extensions_ignores_hidden_and_custom_dirs(tmp_path: Path) -> None:
    img, mask = synthetic_pair(0)
    for stem, ext in (("a", ".JPG"), ("b", ".bmp"), ("c", ".tiff"), ("d", ".jpeg")):
        _save(img, tmp_path / "rgb" / f"{stem}{ext}")
        _save(mask.astype(np.uint8) * 255, tmp_path / "gt" / f"{stem}.png")
    (tmp_path / "rgb" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "rgb" / "notes.txt").write_text("hello")
    (tmp_path / "gt" / "._a.png").write_bytes(b"junk")
    ds = SegmentationFolder(tmp_path, image_dir="rgb", mask_dir="gt")
    assert ds.stems == ["a", "b", "c", "d"]
    assert all(np.array_equal(s.mask, mask) for s in ds)


def test_folder_split_file_list_and_relative(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=5, split=["3", "1"])
    assert SegmentationFolder(root, split=root / "split.txt").stems == ["3", "1"]  # split order kept
    assert SegmentationFolder(root, split="split.txt").stems == ["3", "1"]  # relative to root
    assert SegmentationFolder(root, split=["4", "0"]).stems == ["4", "0"]
    (root / "commented.txt").write_text("# header\n\n 2 \n0  # first\n")
    assert SegmentationFolder(root, split=root / "commented.txt").stems == ["2", "0"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("1\n7\nx9\n", r"names stems that are not in the dataset: '7', 'x9'"),
        ("1\n2\n1\n", r"lists stems more than once: '1'"),
        ("\n# nothing\n", r"lists no stems"),
    ],
)
def test_folder_bad_split_file(tmp_path: Path, content: str, pattern: str) -> None:
    root = write_folder_dataset(tmp_path / "d", n=3)
    (root / "s.txt").write_text(content)
    with pytest.raises(DatasetError, match=pattern) as exc:
        SegmentationFolder(root, split=root / "s.txt")
    assert "s.txt" in str(exc.value)


def test_folder_split_missing_or_empty_list(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=3)
    with pytest.raises(DatasetError, match=r"split file not found: .*missing\.txt"):
        SegmentationFolder(root, split=root / "missing.txt")
    with pytest.raises(DatasetError, match="split list is empty"):
        SegmentationFolder(root, split=[])


def test_folder_missing_root_and_dirs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"SegmentationFolder root not found: .*nowhere"):
        SegmentationFolder(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetError, match="root is not a directory"):
        SegmentationFolder(tmp_path / "f")
    (tmp_path / "d" / "masks").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"image folder not found: .*d/images"):
        SegmentationFolder(tmp_path / "d")
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"mask folder not found: .*e/masks"):
        SegmentationFolder(tmp_path / "e")


def test_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="empty dataset"):
        SegmentationFolder(tmp_path)
    _save(np.zeros((4, 4), np.uint8), tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"no images .* in .*images"):
        SegmentationFolder(tmp_path)


def test_folder_unpaired_stems_named(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=4)
    (root / "masks" / "1.png").unlink()
    (root / "masks" / "3.png").rename(root / "masks" / "3.jpg")
    _save(np.zeros((HEIGHT, WIDTH), np.uint8), root / "masks" / "orphan.png")
    with pytest.raises(DatasetError) as exc:
        SegmentationFolder(root)
    msg = str(exc.value)
    assert "images without a mask" in msg and "'1', '3'" in msg
    assert "non-PNG masks '3.jpg'" in msg
    assert "masks without an image: 'orphan'" in msg


def test_folder_ambiguous_stem(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=2)
    _save(synthetic_pair(0)[0], root / "images" / "0.jpg")
    with pytest.raises(
        DatasetError, match=r"ambiguous stem '0'.*0\.jpg.*0\.png|ambiguous stem '0'.*0\.png.*0\.jpg"
    ):
        SegmentationFolder(root)


def test_folder_lazy_corrupt_files_fail_on_access(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=3)
    (root / "images" / "1.png").write_bytes(b"corrupt")
    (root / "masks" / "2.png").write_bytes(b"corrupt")
    ds = SegmentationFolder(root)  # index only: no decode yet
    assert len(ds) == 3 and ds[0].stem == "0"
    with pytest.raises(DatasetError, match=r"cannot read image .*images/1\.png"):
        ds[1]
    with pytest.raises(DatasetError, match=r"cannot read mask .*masks/2\.png"):
        ds[2]
    with pytest.raises(DatasetError, match="cannot read image"):
        ds.verify()


def test_folder_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=2)
    _save(np.zeros((HEIGHT - 8, WIDTH), np.uint8), root / "masks" / "1.png")
    ds = SegmentationFolder(root)
    with pytest.raises(DatasetError) as exc:
        ds[1]
    msg = str(exc.value)
    assert f"{WIDTH}x{HEIGHT}" in msg and f"{WIDTH}x{HEIGHT - 8}" in msg
    assert "images/1.png" in msg and "masks/1.png" in msg


def test_folder_nonbinary_masks_warn_once_per_dataset(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n=4)
    for stem in ("1", "3"):
        m = np.asarray(Image.open(root / "masks" / f"{stem}.png")).copy()
        m[m == 255] = 200
        m[0, 0] = 100  # below threshold -> background
        _save(m, root / "masks" / f"{stem}.png")
    ds = SegmentationFolder(root)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")  # would show duplicates if the dataset warned per file
        samples = list(ds) + list(ds)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "masks/1.png" in msgs[0] and "once per dataset" in msgs[0]
    _, truth = synthetic_pair(1)
    assert np.array_equal(samples[1].mask, truth)  # 200 -> True, 100 -> False
    with pytest.warns(UserWarning, match="masks/1.png"):  # a new dataset object warns again
        SegmentationFolder(root)[1]


# ----------------------------------------------------------------------------------------------------------
# FSS-1000
# ----------------------------------------------------------------------------------------------------------


def test_fss1000_layout(tmp_path: Path) -> None:
    root = write_fss1000_dataset(tmp_path / "fss", classes=("cat", "dog", "eel"), n_per_class=11)
    ds = FSS1000(root)
    assert len(ds) == 33 and ds.classes == ["cat", "dog", "eel"]
    assert ds.stems[:3] == ["cat/1", "cat/2", "cat/3"] and ds.stems[10] == "cat/11"
    s = ds[ds.index("dog/4")]
    _, mask = synthetic_pair(100 * 1 + 4)
    assert np.array_equal(s.mask, mask) and s.image.shape == (HEIGHT, WIDTH, 3)
    assert s.image_path.name == "4.jpg" and s.mask_path is not None and s.mask_path.name == "4.png"
    assert ds.class_of(ds.index("eel/2")) == "eel"
    sub = FSS1000(root, classes=["eel", "cat"])
    assert sub.classes == ["eel", "cat"] and sub.stems[0] == "eel/1" and len(sub) == 22
    (tmp_path / "test_classes.txt").write_text("dog\n")
    assert FSS1000(root, classes=tmp_path / "test_classes.txt").classes == ["dog"]


def test_fss1000_errors(tmp_path: Path) -> None:
    root = write_fss1000_dataset(tmp_path / "fss", classes=("cat", "dog"), n_per_class=3)
    with pytest.raises(DatasetError, match="classes not found.*'zebra'"):
        FSS1000(root, classes=["cat", "zebra"])
    (root / "dog" / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"dog: images without a mask .*'2'"):
        FSS1000(root)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*empty has no images"):
        FSS1000(root, classes=["empty"])
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        FSS1000(tmp_path / "none")
    with pytest.raises(DatasetError, match="FSS1000 root not found"):
        FSS1000(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------------------
# VOC instances
# ----------------------------------------------------------------------------------------------------------


def test_voc_instances_match_truth_void_is_background(tmp_path: Path) -> None:
    root, truth = write_voc_dataset(tmp_path / "voc", instances_per_photo=(2, 1, 3))
    ds = VOCInstances(root)
    expected = [f"{p}_{i}" for p in sorted(truth) for i in sorted(truth[p])]
    assert ds.stems == expected and len(ds) == 6  # the unannotated photo is ignored
    obj_ids = np.asarray(Image.open(root / "SegmentationObject" / "2000_000000.png"))
    assert (obj_ids == 255).any()  # the tree really has void pixels
    for i, s in enumerate(ds):
        photo, iid = s.stem.rsplit("_", 1)
        assert ds.instance_id(i) == int(iid)
        assert np.array_equal(s.mask, truth[photo][int(iid)])
        assert not s.mask[obj_ids == 255].any() if photo == "2000_000000" else True
        assert s.image_path.name == f"{photo}.jpg" and s.image.shape == (HEIGHT, WIDTH, 3)
        assert ds.class_id(i) == int(iid) % 20 + 1


def test_voc_splits(tmp_path: Path) -> None:
    root, truth = write_voc_dataset(tmp_path / "voc", instances_per_photo=(2, 1, 3), val_photos=1)
    assert {s.rsplit("_", 1)[0] for s in VOCInstances(root, split="train").stems} == {
        "2000_000000",
        "2000_000001",
    }
    assert VOCInstances(root, split="val").stems == [f"2000_000002_{i}" for i in sorted(truth["2000_000002"])]
    assert VOCInstances(root, split=["2000_000001"]).stems == ["2000_000001_1"]
    (tmp_path / "mine.txt").write_text("2000_000001\n")
    assert VOCInstances(root, split=tmp_path / "mine.txt").stems == ["2000_000001_1"]
    with pytest.raises(DatasetError, match=r"not in the dataset: '2000_999999'"):
        VOCInstances(root, split=["2000_999999"])  # photo exists but has no instance PNG
    with pytest.raises(DatasetError, match=r"split file not found: .*ImageSets/Segmentation/test\.txt"):
        VOCInstances(root, split="test")


def test_voc_min_pixels(tmp_path: Path) -> None:
    root, truth = write_voc_dataset(tmp_path / "voc")
    areas = {f"{p}_{i}": int(m.sum()) for p in truth for i, m in truth[p].items()}
    cut = sorted(areas.values())[2]
    assert set(VOCInstances(root, min_pixels=cut).stems) == {s for s, a in areas.items() if a >= cut}


def test_voc_errors(tmp_path: Path) -> None:
    root, _ = write_voc_dataset(tmp_path / "voc")
    (root / "JPEGImages" / "2000_000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"instance masks without a photo .*'2000_000001'"):
        VOCInstances(root)
    root2, _ = write_voc_dataset(tmp_path / "voc2")
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    _save(rgb, root2 / "SegmentationObject" / "2000_000001.png")
    with pytest.raises(DatasetError, match=r"2000_000001\.png has mode RGB; expected a palette"):
        VOCInstances(root2)
    (tmp_path / "v3" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match="VOC SegmentationObject folder not found"):
        VOCInstances(tmp_path / "v3")
    (tmp_path / "v3" / "SegmentationObject").mkdir()
    with pytest.raises(DatasetError, match="no instance PNGs"):
        VOCInstances(tmp_path / "v3")
    empty_ids = Image.frombytes("P", (4, 4), bytes([0, 255] * 8))  # background + void only
    empty_ids.putpalette(list(range(256)) * 3)  # without a palette Pillow would remap the indices
    empty_ids.save(tmp_path / "v3" / "SegmentationObject" / "x.png")
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "v3" / "JPEGImages" / "x.jpg")
    with pytest.raises(DatasetError, match="no object instances"):
        VOCInstances(tmp_path / "v3")


# ----------------------------------------------------------------------------------------------------------
# Factory, helpers, bundled examples
# ----------------------------------------------------------------------------------------------------------


def test_build_dataset(tmp_path: Path) -> None:
    folder = build_dataset("folder", write_folder_dataset(tmp_path / "f", n=2), split=["1"])
    assert isinstance(folder, SegmentationFolder) and folder.stems == ["1"]
    fss = build_dataset("FSS-1000", write_fss1000_dataset(tmp_path / "s"), classes=["dog"])
    assert isinstance(fss, FSS1000) and len(fss) == 3
    voc = build_dataset("voc", write_voc_dataset(tmp_path / "v")[0], split="val")
    assert isinstance(voc, VOCInstances) and len(voc) > 0
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'coco'.*'folder', 'fss1000', 'voc'"):
        build_dataset("coco", tmp_path)


def test_synthetic_helpers_are_deterministic() -> None:
    a, b = make_samples(3, seed=1), make_samples(3, seed=1)
    assert [s.stem for s in a] == ["syn_000", "syn_001", "syn_002"]
    assert all(
        np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True)
    )
    assert not np.array_equal(a[0].mask, a[1].mask)
    for s in a:
        assert s.image.shape == (HEIGHT, WIDTH, 3) and 0.02 < s.mask.mean() < 0.5
        assert abs(s.image[s.mask].mean() - s.image[~s.mask].mean()) > 20  # object is visible


@pytest.mark.parametrize(("name", "count"), [("cvc_clinicdb", 24), ("ph2", 12)])
def test_bundled_examples(name: str, count: int) -> None:
    root = EXAMPLES / name
    ds = SegmentationFolder(root)
    assert len(ds) == count
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["stem"] for r in rows) == sorted(ds.stems)
    assert {r["split"] for r in rows} == {"train"}
    assert (root / "LICENSE.md").read_text().count("Cite") >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bundled masks are exactly binary: no threshold warning
        for s in ds:
            raw = np.asarray(Image.open(s.mask_path))
            assert raw.ndim == 2 and set(np.unique(raw).tolist()) <= {0, 255}
            assert s.mask.shape == s.image.shape[:2] and max(s.image.shape[:2]) == 384
            assert 0 < s.mask.mean() < 1


def test_bundled_examples_size_budget() -> None:
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024
