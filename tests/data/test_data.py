"""The data layer: scanning, validation, conversion to RGB, splitting, split.csv and skipped.csv."""

from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from transferlab.data import (Sample, decode, read_split_csv, scan, split_dataset, stratified_split,
                              write_skipped_csv, write_split_csv)
from transferlab.errors import DataError, ImageError

from ..conftest import photo_crops, sample_photo


def _copy_photos(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_scan_skips_bad_files_with_reasons(photos_dir, tmp_path):
    root = _copy_photos(photos_dir, tmp_path / "data")
    good = (root / "cat" / "cat_00.jpg").read_bytes()
    (root / "cat" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "coffee" / "empty.png").write_bytes(b"")
    (root / "coffee" / "notes.txt").write_text("not a picture")
    (root / "coffee" / "fake.jpg").write_text("a text file with an image extension")
    ds = split_dataset(scan(root), seed=0)
    write_skipped_csv(ds.skipped, tmp_path / "skipped.csv")
    with open(tmp_path / "skipped.csv", newline="") as f:
        rows = {r["path"].split("/")[-1]: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {"broken.jpg", "empty.png", "notes.txt", "fake.jpg"}
    assert "truncated" in rows["broken.jpg"]
    assert "empty" in rows["empty.png"]
    assert "not an image" in rows["notes.txt"]
    assert "not an image" in rows["fake.jpg"]
    assert ds.classes == ["cat", "coffee"]
    assert len(ds.samples) == 24
    assert {s.split for s in ds.samples} == {"train", "val", "test"}


def test_uppercase_extensions_and_nested_folders(tmp_path):
    for label, name in (("a", "chelsea"), ("b", "coffee")):
        (tmp_path / label / "sub").mkdir(parents=True)
        for i, im in enumerate(photo_crops(name, 3)):
            im.save(tmp_path / label / "sub" / f"x{i}.JPG" if i else tmp_path / label / f"x{i}.PnG",
                    format="JPEG" if i else "PNG")
    ds = scan(tmp_path)
    assert len(ds.samples) == 6 and not ds.skipped


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(sample_photo("coffee")).resize((64, 48))
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        path = tmp_path / "x.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out, info = decode(path)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert any("converted to RGB" in c for c in info.conversions)
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
        assert np.asarray(out).max() > 200


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(sample_photo("coffee")).resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    out, info = decode(tmp_path / "r.jpg")
    assert out.size == (40, 80)
    assert any("EXIF orientation 6" in c for c in info.conversions)


def test_decode_errors_are_image_errors(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        decode(tmp_path / "z.png")
    with pytest.raises(ImageError, match="not found"):
        decode(tmp_path / "missing.png")


def test_no_such_folder():
    with pytest.raises(DataError, match="no such file or folder"):
        scan("/nonexistent/folder/xyz")


def test_fewer_than_two_classes_names_folder(tmp_path):
    (tmp_path / "only").mkdir()
    photo_crops("coffee", 1)[0].save(tmp_path / "only" / "a.jpg")
    with pytest.raises(DataError, match=r"at least two classes.*found 1 \('only'\)"):
        scan(tmp_path)


def test_class_with_no_usable_image(photos_dir, tmp_path):
    root = _copy_photos(photos_dir, tmp_path / "data")
    (root / "dog").mkdir()
    (root / "dog" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="no usable image: 'dog'"):
        scan(root)


def _samples(counts):
    return [Sample(f"/x/{c}/{i}.png", c) for c, n in counts.items() for i in range(n)]


def test_stratified_split_fractions_and_seed():
    samples = _samples({"a": 100, "b": 40})
    s1 = stratified_split(samples, 0.15, 0.15, seed=3)
    s2 = stratified_split(samples, 0.15, 0.15, seed=3)
    s3 = stratified_split(samples, 0.15, 0.15, seed=4)
    assert s1 == s2 and s1 != s3
    for c, n in (("a", 100), ("b", 40)):
        got = {sp: sum(1 for s in s1 if s.label == c and s.split == sp) for sp in ("train", "val", "test")}
        assert got["val"] == round(n * 0.15) and got["test"] == round(n * 0.15)
        assert sum(got.values()) == n


def test_small_class_warns_and_is_named(caplog):
    samples = _samples({"big": 20, "tiny": 2, "single": 1})
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        out = stratified_split(samples, seed=0)
    assert "'tiny'" in caplog.text and "'single'" in caplog.text
    assert [s.split for s in out if s.label == "single"] == ["train"]
    assert sorted(s.split for s in out if s.label == "tiny") == ["test", "train"]


def test_split_csv_roundtrip_and_manifest(photos_dir, tmp_path):
    ds = split_dataset(scan(photos_dir), seed=1)
    write_split_csv(ds.samples, tmp_path / "split.csv")
    assert read_split_csv(tmp_path / "split.csv") == ds.samples
    again = split_dataset(scan(tmp_path / "split.csv"), seed=99)  # a split.csv is a manifest
    assert sorted(again.samples) == sorted(ds.samples)


def test_presplit_layout_kept(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label, name in (("cat", "chelsea"), ("cup", "coffee")):
            d = tmp_path / split / label
            d.mkdir(parents=True)
            for i, im in enumerate(photo_crops(name, n, seed=hash(split) % 100)):
                im.save(d / f"{i}.jpg")
    ds = split_dataset(scan(tmp_path), seed=0)
    assert ds.layout == "presplit"
    for s in ds.samples:
        assert f"/{s.split}/{s.label}/" in s.path


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    """An IDX file as the MNIST distribution writes it (unsigned bytes, big-endian dimensions)."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _idx_folder(root, n_train: int = 60, n_test: int = 20, gz: bool = True):
    """Tiny MNIST-format files: 28x28 images whose pixels encode their index (so files can be traced)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        _write_idx(root / f"{stem}-images-idx3-ubyte", images, gz)
        _write_idx(root / f"{stem}-labels-idx1-ubyte", labels, gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_idx_import_writes_presplit_folders(tmp_path, gz):
    from transferlab.data.imports import import_idx, read_idx

    src = _idx_folder(tmp_path / "src", gz=gz)
    counts = import_idx("fashion-mnist", src, tmp_path / "out", train_per_class=3, val_per_class=2, seed=1)
    assert counts == {"train": 30, "val": 20, "test": 20}
    ds = scan(tmp_path / "out")
    assert ds.layout == "presplit" and len(ds.classes) == 10 and "T-shirt_top" in ds.classes
    assert {s.split for s in ds.samples} == {"train", "val", "test"}
    train = {s.path for s in ds.samples if s.split == "train"}
    val = {s.path for s in ds.samples if s.split == "val"}
    assert not train & val
    # pixels survive: a train file's first pixel is its index in the source file
    some = next(p for p in sorted(train))
    index = int(some.rsplit("_", 1)[1].split(".")[0])
    images = read_idx(next(src.glob("train-images*")))
    assert np.array_equal(np.asarray(Image.open(some)), images[index])
    assert Image.open(some).size == (28, 28)


def test_idx_import_everything_and_errors(tmp_path):
    from transferlab.data.imports import import_idx, read_idx

    src = _idx_folder(tmp_path / "src", gz=False)
    assert import_idx("mnist", src, tmp_path / "all") == {"train": 60, "test": 20}
    assert sorted(p.name for p in (tmp_path / "all" / "train").iterdir()) == [str(d) for d in range(10)]
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 16)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(DataError, match="needs 100"):
        read_idx(short)
    with pytest.raises(DataError, match="no t10k-images"):
        (src / "t10k-images-idx3-ubyte").unlink()
        import_idx("mnist", src, tmp_path / "x")
    with pytest.raises(DataError, match="unknown dataset"):
        import_idx("kmnist", src, tmp_path / "x")


def test_idx_import_cli(tmp_path):
    from typer.testing import CliRunner

    from transferlab.cli import app

    src = _idx_folder(tmp_path / "src")
    res = CliRunner().invoke(app, ["data", "import", "fashion-mnist", str(src), "--out", str(tmp_path / "o"),
                                   "--per-class", "2", "--val-per-class", "1"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "o" / "train").rglob("*.png"))) == 20
    assert len(list((tmp_path / "o" / "val").rglob("*.png"))) == 10
