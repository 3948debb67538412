"""Data you can trust: audit, hostile files, crash-safe saving, imports."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import struct
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.cli import main
from transferlab.data.imports import import_cifar
from transferlab.errors import DataError
from transferlab.pipeline import train
from transferlab.predict import load_model
from transferlab.diagnostics.dataset import check_dataset


def _presplit_digits(src: Path, root: Path, per_class: int = 10, classes=("0", "1", "2")) -> Path:
    for label in classes:
        files = sorted((src / label).iterdir())[:per_class]
        for split, chunk in (("train", files[:6]), ("val", files[6:8]), ("test", files[8:10])):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, root / split / label / f.name)
    return root


@pytest.mark.slow
def test_data_check_reports_cross_split_duplicate_and_near_duplicate(digits_dir, tmp_path, capsys):
    root = _presplit_digits(digits_dir, tmp_path / "data")
    train_img = sorted((root / "train" / "1").iterdir())[0]
    shutil.copy(train_img, root / "test" / "1" / "leaked_copy.png")  # exact duplicate across splits
    other = sorted((root / "train" / "2").iterdir())[0]
    arr = np.asarray(Image.open(other).convert("RGB")).astype(np.int16)
    Image.fromarray(np.clip(arr + 3, 0, 255).astype(np.uint8)).save(root / "val" / "2" / "near_copy.jpg", quality=95)
    rep = check_dataset(root, quiet=True, cache_dir=str(tmp_path / "cache"))
    exact = [g for g in rep.exact_duplicates if "across splits" in g["kind"]]
    assert len(exact) == 1 and {Path(f["path"]).name for f in exact[0]["files"]} == {train_img.name, "leaked_copy.png"}
    near = [p for p in rep.near_duplicates if {Path(f["path"]).name for f in p["files"]} == {other.name, "near_copy.jpg"}]
    assert near and near[0]["kind"] == "across splits" and near[0]["similarity"] >= 0.97
    assert any("more than one split" in w for w in rep.warnings)
    assert main(["data", "check", str(root), "--json", "-q", "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exact_duplicates"] and data["near_duplicates"] and data["counts"]["1"]["test"] == 3
    res = train(root, tmp_path / "run", mode="head", quiet=True, diagnose=False, dedupe=True, epochs=3, image_size=64)
    assert res.metrics["n_images"]["test"] == 6
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "leaked_copy.png" in skipped and "--dedupe" in skipped


def _png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb as attackers make them: a small 1-bit PNG whose header declares
    ``width`` x ``height`` pixels (its data a few compressed rows of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _hostile_corpus(folder: Path, seed_img: Image.Image) -> list[Path]:
    rng = np.random.default_rng(0)
    made: list[Path] = []
    encoded = {}
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif")):
        buf = io.BytesIO()
        seed_img.save(buf, fmt)
        encoded[ext] = buf.getvalue()
    for ext, data in encoded.items():
        for k, frac in enumerate(np.linspace(0.02, 0.98, 12)):
            p = folder / f"truncated_{k}.{ext}"
            p.write_bytes(data[: max(1, int(len(data) * frac))])
            made.append(p)
        for k in range(24):
            b = bytearray(data)
            for _ in range(8):
                i = int(rng.integers(0, len(b)))
                b[i] ^= 1 << int(rng.integers(0, 8))
            p = folder / f"bitflip_{k}.{ext}"
            p.write_bytes(bytes(b))
            made.append(p)
        for k in range(3):
            p = folder / f"empty_{k}.{ext.upper()}"
            p.write_bytes(b"")
            made.append(p)
        p = folder / f"text_as_{ext}.{ext}"
        p.write_text("just some text, not an image")
        made.append(p)
        p = folder / f"wrong_extension_{ext}.{'png' if ext != 'png' else 'jpg'}"
        p.write_bytes(data)
        made.append(p)
    for k, (w, h) in enumerate(((100000, 100000), (60000, 60000), (20000, 30000))):
        p = folder / f"huge_{k}.png"
        p.write_bytes(_png_declaring(w, h))
        made.append(p)
    frames = [seed_img.rotate(a) for a in (0, 90, 180)]
    for ext in ("gif", "webp"):
        p = folder / f"animated.{ext}"
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
        made.append(p)
    for name in ("naïve café ü.png", "space in name .png", "日本語.png", "emoji 🐱.png"):
        p = folder / name
        seed_img.save(p)
        made.append(p)
    dangling = folder / "dangling_link.png"
    dangling.symlink_to(folder / "does_not_exist.png")
    made.append(dangling)
    locked = folder / "locked.png"
    seed_img.save(locked)
    os.chmod(locked, 0)
    made.append(locked)
    loop = folder / "loop"
    loop.mkdir()
    (loop / "back").symlink_to(folder, target_is_directory=True)
    return made


@pytest.mark.slow
def test_hostile_corpus_never_breaks_check_train_or_predict(digits_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for label in ("3", "4"):
        shutil.copytree(digits_dir / label, root / label)
    hostile = _hostile_corpus(root / "3", Image.open(next((digits_dir / "3").iterdir())).convert("RGB"))
    assert len(hostile) >= 200
    rep = check_dataset(root, near=False, quiet=True)
    reported = {r["path"] for r in rep.unreadable} | {c["path"] for c in rep.converted}
    # the clean class is counted in full; the hostile one keeps its good images and the unicode names
    assert sum(rep.counts["4"].values()) == len(list((digits_dir / "4").iterdir()))
    assert sum(rep.counts["3"].values()) >= len(list((digits_dir / "3").iterdir())) + 4
    assert len(rep.unreadable) >= 83  # at least the 60 truncated, 15 empty, 5 text and 3 huge files
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--mode", "head", "--epochs", "2", "--no-diagnose",
                 "--image-size", "64", "-q", "--json"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    split = {r["path"] for r in csv.DictReader(open(tmp_path / "run" / "split.csv"))}
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "skipped.csv"))}
    for p in hostile:
        key = os.path.abspath(p)
        assert key in split or key in skipped or str(p) in skipped, p
        assert key not in skipped or skipped[key]
        assert key in split or str(p) in reported or key in reported, p
    assert any("symlink loop" in r for r in skipped.values())
    assert any("decompression bomb" in skipped.get(os.path.abspath(p), "") for p in hostile if "huge" in p.name)
    assert main(["predict", str(tmp_path / "run" / "model"), str(root / "3"), "--json"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    preds = {r["path"]: r for r in json.loads(out.out)}
    for p in hostile:
        if p.name == "dangling_link.png" or p.is_file():
            r = preds.get(str(p))
            assert r is not None, p
            assert r["label"] is not None or r["error"], p


@pytest.mark.slow
def test_sigkill_while_saving_keeps_previous_model(digits_dir, tmp_path):
    data = _presplit_digits(digits_dir, tmp_path / "data")
    run = tmp_path / "run"
    train(data, run, mode="head", quiet=True, diagnose=False, epochs=2, image_size=64)
    before = (run / "model" / "config.json").read_text()
    env = {**os.environ, "TRANSFERLAB_FAULT_SAVE_PAUSE_S": "60"}
    p = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "train", str(data), "--out", str(run), "--mode",
                          "head", "--epochs", "3", "--image-size", "64", "--seed", "9", "-q", "--overwrite"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(run.glob(".model.*.tmp/config.json")):
        time.sleep(0.05)
    assert list(run.glob(".model.*.tmp/config.json")), "the second save never started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (run / "model" / "config.json").read_text() == before
    model = load_model(run / "model")
    assert model.predict([str(next((data / "test" / "1").iterdir()))])[0].error is None


def _cifar_archive(path: Path, classes=("airplane", "automobile", "bird"), n_labels: int | None = None) -> None:
    rng = np.random.default_rng(0)

    def batch(n, offset):
        labels = [int(i % (n_labels or len(classes))) for i in range(n)]
        data = np.zeros((n, 3 * 32 * 32), dtype=np.uint8)
        for i, y in enumerate(labels):  # each class a distinct colour with noise: learnable
            img = np.zeros((3, 32, 32), dtype=np.int16)
            img[y % 3] = 200
            data[i] = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8).ravel()
        return pickle.dumps({b"batch_label": f"batch {offset}".encode(), b"labels": labels, b"data": data,
                             b"filenames": [f"f{offset}_{i}.png".encode() for i in range(n)]}, protocol=2)

    with tarfile.open(path, "w:gz") as tar:
        members = {"batches.meta": pickle.dumps({b"label_names": [c.encode() for c in classes]}, protocol=2)}
        for k in range(1, 6):
            members[f"data_batch_{k}"] = batch(12, k)
        members["test_batch"] = batch(15, 9)
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.slow
def test_cifar_import_and_train(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _cifar_archive(archive)
    counts = import_cifar("cifar10", str(archive), tmp_path / "cifar")
    assert counts == {"train": 60, "test": 15}
    assert sorted(p.name for p in (tmp_path / "cifar" / "train").iterdir()) == ["airplane", "automobile", "bird"]
    res = train(tmp_path / "cifar", tmp_path / "run", mode="head", quiet=True, diagnose=False, image_size=64)
    assert res.metrics["n_images"]["test"] == 15 and res.metrics["test"]["accuracy"] > 0.6


def test_cifar_import_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        blob = pickle.dumps({"label_names": Evil()})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="refusing to load"):
        import_cifar("cifar10", str(archive), tmp_path / "out")


@pytest.mark.slow
def test_import_csv_and_train_from_manifest(digits_dir, tmp_path, capsys):
    rows = [("path", "label", "split")]
    for label in ("5", "6"):
        for i, f in enumerate(sorted((digits_dir / label).iterdir())[:10]):
            rows.append((str(f), label, "train" if i < 6 else "val" if i < 8 else "test"))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert main(["data", "import", "csv", str(manifest), "--out", str(tmp_path / "imported")]) == 0
    assert len(list((tmp_path / "imported" / "train" / "5").iterdir())) == 6
    res = train(manifest, tmp_path / "run", mode="head", quiet=True, diagnose=False, epochs=2, image_size=64)
    assert res.metrics["n_images"] == {"train": 12, "val": 4, "test": 4}
    assert main(["data", "split", str(tmp_path / "imported"), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 20


def _thin_png(path: Path, size=(5, 8_000_000)) -> Path:
    Image.new("L", size, 255).save(path, optimize=True)  # 46 KB on disk
    return path


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


@pytest.mark.slow
def test_thin_eps_and_16bit_tiff_through_train_and_predict(digits_dir, tmp_path):
    from transferlab.data.images import decode
    from transferlab.data.transforms import EvalTransform, Preprocessing
    from transferlab.errors import ImageError

    root = tmp_path / "data"
    for label in ("3", "4"):
        shutil.copytree(digits_dir / label, root / label)
    thin = _thin_png(root / "3" / "thin.png")
    eps = root / "3" / "eps_as.jpg"
    eps.write_bytes(_EPS)
    tiff = root / "4" / "deep.tif"
    Image.fromarray((np.arange(1500 * 1500, dtype=np.uint32) % 65536).astype(np.uint16).reshape(1500, 1500)).save(tiff)
    with pytest.raises(ImageError, match="aspect ratio"):
        decode(thin)
    with pytest.raises(ImageError, match="not an image in a supported format"):
        decode(eps)
    assert decode(tiff)[0].size == (1500, 1500)
    # the transform itself resizes only the crop it keeps, whatever reaches it
    assert tuple(EvalTransform(Preprocessing(224))(Image.new("RGB", (5, 400_000))).shape) == (3, 224, 224)
    res = train(root, tmp_path / "run", mode="head", quiet=True, diagnose=False, epochs=2, image_size=64)
    skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "skipped.csv"))}
    assert "aspect ratio" in skipped["thin.png"] and "not an image in a supported format" in skipped["eps_as.jpg"]
    assert tiff.name not in skipped and res.metrics["n_images"]["train"] > 0
    preds = load_model(res.model_dir).predict([str(thin), str(eps), str(tiff)])
    assert preds[0].error and preds[1].error and preds[2].error is None


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_traversal_labels_never_write_outside_out(digits_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    archive = tmp_path / "cifar-10-python.tar.gz"
    _cifar_archive(archive, classes=("airplane", "../../escaped", "bird"))
    before = _listing(tmp_path)
    with pytest.raises(DataError, match="class name '../../escaped'"):
        import_cifar("cifar10", str(archive), work / "cifar")
    assert _listing(tmp_path) - before <= {"work/cifar", "work/cifar/train", "work/cifar/train/airplane"} | {
        p for p in _listing(tmp_path) if p.startswith("work/cifar/train/airplane/")}
    assert not (tmp_path / "escaped").exists() and not (work / "escaped").exists()
    manifest = tmp_path / "m.csv"
    files = sorted((digits_dir / "5").iterdir())[:4]
    rows = [("path", "label")] + [(str(f), "five") for f in files[:2]] + [(str(files[2]), "../outside"),
                                                                          (str(files[3]), "/srv/www")]
    with open(manifest, "w", newline="", encoding="utf-8-sig") as fh:  # with a spreadsheet's BOM
        csv.writer(fh).writerows(rows)
    before = _listing(tmp_path)
    assert main(["data", "import", "csv", str(manifest), "--out", str(work / "imported")]) == 2
    assert _listing(tmp_path) == before
    with pytest.raises(DataError, match="line 4"):
        train(manifest, tmp_path / "run", mode="head", quiet=True, diagnose=False)


def test_cifar_labels_out_of_range_and_member_bombs(tmp_path, monkeypatch):
    import transferlab.data.imports as imports

    archive = tmp_path / "cifar-10-python.tar.gz"
    _cifar_archive(archive, classes=("a", "b"), n_labels=3)  # labels 0..2 against two names
    with pytest.raises(DataError, match="labels must be in 0..1"):
        import_cifar("cifar10", str(archive), tmp_path / "out")
    _cifar_archive(archive)
    monkeypatch.setattr(imports, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DataError, match="over the limit"):
        import_cifar("cifar10", str(archive), tmp_path / "out2")


def test_manifest_labels_round_trip_exactly(digits_dir, tmp_path):
    from transferlab.data.scan import scan
    from transferlab.data.split import read_split_csv, split_dataset, write_split_csv

    root = tmp_path / "data"
    for label, name in (("1", " b"), ("2", "a")):
        shutil.copytree(digits_dir / label, root / name)
    ds = split_dataset(scan(root), 0.2, 0.2, 0)
    write_split_csv(ds.samples, tmp_path / "split.csv")
    assert sorted({s.label for s in scan(tmp_path / "split.csv").samples}) == [" b", "a"]
    assert {s.label for s in read_split_csv(tmp_path / "split.csv")} == {" b", "a"}


@pytest.mark.slow
def test_train_never_clobbers_and_resume_reads_its_own_checkpoint(digits_dir, tmp_path, capsys):
    from transferlab.errors import ConfigError

    data = _presplit_digits(digits_dir, tmp_path / "data")
    run = tmp_path / "run"
    common = [str(data), "--out", str(run), "--mode", "finetune", "--ft-epochs", "1", "--image-size", "64", "-q"]
    assert main(["train", *common]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # not one file per epoch
    first = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", *common]) == 2
    assert "already holds a transferlab run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--overwrite"):
        train(data, run, mode="head", quiet=True, diagnose=False)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        train(data, tmp_path / "plain", mode="head", quiet=True, diagnose=False)
    assert main(["train", *common, "--overwrite", "--seed", "3"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt"] and (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns != first
    assert json.loads((run / "train_config.json").read_text())["config"]["seed"] == 3
    assert main(["train", "--resume", str(run), "-q"]) == 0  # resumes the checkpoint the second run wrote
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_report_failure_keeps_a_loadable_model_and_files_follow_the_umask(digits_dir, tmp_path, monkeypatch):
    import transferlab.finish as finish

    data = _presplit_digits(digits_dir, tmp_path / "data")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finish, "report_sections", broken)
    with pytest.raises(OSError):
        train(data, tmp_path / "run", mode="head", quiet=True, diagnose=False, epochs=2, image_size=64)
    model = load_model(tmp_path / "run" / "model")
    assert model.predict([str(next((data / "test" / "1").iterdir()))])[0].error is None
    old = os.umask(0o022)
    os.umask(old)
    if old & 0o044 == 0:  # group and others may read under this umask: so may they read the model
        for f in ("config.json", "model.safetensors"):
            assert os.stat(tmp_path / "run" / "model" / f).st_mode & 0o044 == 0o044, f
        assert os.stat(tmp_path / "run" / "model").st_mode & 0o055 == 0o055
        assert os.stat(tmp_path / "run" / "split.csv").st_mode & 0o044 == 0o044


def test_cache_clear_spares_foreign_folders_and_a_read_only_cache_is_a_warning(tmp_path, caplog):
    from transferlab.features.cache import FeatureCache

    root = tmp_path / "shared"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "keep.txt").write_text("not the cache's")
    (root / "0123456789abcdef").mkdir()  # the cache's name shape, but no marker
    ns = FeatureCache(root).namespace({"backbone": "x", "size": 1})
    ns.put(["d1", "d2"], np.ones((2, 4), np.float32))
    assert ns.dir.is_dir()
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not ns.dir.exists()
    assert (root / "photos" / "keep.txt").read_text() == "not the cache's" and (root / "0123456789abcdef").is_dir()
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        ns = FeatureCache(ro).namespace({"backbone": "x"})
        ns.put(["d"], np.ones((1, 4), np.float32))
        assert ns.disabled and "feature cache disabled" in caplog.text
    ns = FeatureCache(tmp_path / "full").namespace({"backbone": "x"})
    import transferlab.features.cache as cache_mod

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    orig = cache_mod.save_file
    cache_mod.save_file = no_space
    try:
        ns.put(["d"], np.ones((1, 4), np.float32))
    finally:
        cache_mod.save_file = orig
    assert ns.disabled and "No space left" in caplog.text


@pytest.mark.slow
def test_markup_in_class_names_and_paths_prints_as_text(digits_dir, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "1", root / "[/x]")
    shutil.copytree(digits_dir / "2", root / "[bold]b")
    assert main(["data", "check", str(root), "-q", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr()
    assert "[/x]" in out.out and "MarkupError" not in out.err + out.out
    assert main(["train", str(tmp_path / "missing [/x]"), "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "missing [/x]" in err and "Traceback" not in err


def test_stranger_artifacts_are_bounded(trained_run, tmp_path):
    from transferlab.errors import ArtifactError

    model = tmp_path / "model"
    shutil.copytree(trained_run.model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "head": {**cfg["head"], "hidden": [10 ** 9]}}))
    with pytest.raises(ArtifactError, match="head hidden widths"):
        load_model(model)
