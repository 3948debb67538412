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
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.cli import main
from transferlab.data.imports import import_cifar
from transferlab.errors import DataError
from transferlab.pipeline import train
from transferlab.predict import load_model
from transferlab.tools import check_dataset


def _presplit_digits(src: Path, root: Path, per_class: int = 10, classes=("0", "1", "2")) -> Path:
    for label in classes:
        files = sorted((src / label).iterdir())[:per_class]
        for split, chunk in (("train", files[:6]), ("val", files[6:8]), ("test", files[8:10])):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, root / split / label / f.name)
    return root


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
    res = train(root, tmp_path / "run", mode="head", quiet=True, dedupe=True, epochs=3, image_size=64)
    assert res.metrics["n_images"]["test"] == 6
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "leaked_copy.png" in skipped and "--dedupe" in skipped


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
        Image.new("1", (w, h)).save(p)
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


def test_hostile_corpus_never_breaks_check_train_or_predict(digits_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for label in ("3", "4"):
        shutil.copytree(digits_dir / label, root / label)
    hostile = _hostile_corpus(root / "3", Image.open(next((digits_dir / "3").iterdir())).convert("RGB"))
    assert len(hostile) >= 200
    rep = check_dataset(root, near=False, quiet=True)
    reported = {r["path"] for r in rep.unreadable} | {c["path"] for c in rep.converted}
    counted = {s for c in rep.counts.values() for s in c}
    assert counted
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--mode", "head", "--epochs", "2",
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


def test_sigkill_while_saving_keeps_previous_model(digits_dir, tmp_path):
    data = _presplit_digits(digits_dir, tmp_path / "data")
    run = tmp_path / "run"
    train(data, run, mode="head", quiet=True, epochs=2, image_size=64)
    before = (run / "model" / "config.json").read_text()
    env = {**os.environ, "TRANSFERLAB_FAULT_SAVE_PAUSE_S": "60"}
    p = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "train", str(data), "--out", str(run), "--mode",
                          "head", "--epochs", "3", "--image-size", "64", "--seed", "9", "-q"], env=env,
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


def _cifar_archive(path: Path, classes=("airplane", "automobile", "bird")) -> None:
    rng = np.random.default_rng(0)

    def batch(n, offset):
        labels = [int(i % len(classes)) for i in range(n)]
        data = np.zeros((n, 3 * 32 * 32), dtype=np.uint8)
        for i, y in enumerate(labels):  # each class a distinct colour with noise: learnable
            img = np.zeros((3, 32, 32), dtype=np.int16)
            img[y] = 200
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


def test_cifar_import_and_train(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _cifar_archive(archive)
    counts = import_cifar("cifar10", str(archive), tmp_path / "cifar")
    assert counts == {"train": 60, "test": 15}
    assert sorted(p.name for p in (tmp_path / "cifar" / "train").iterdir()) == ["airplane", "automobile", "bird"]
    res = train(tmp_path / "cifar", tmp_path / "run", mode="head", quiet=True, image_size=64)
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
    res = train(manifest, tmp_path / "run", mode="head", quiet=True, epochs=2, image_size=64)
    assert res.metrics["n_images"] == {"train": 12, "val": 4, "test": 4}
    assert main(["data", "split", str(tmp_path / "imported"), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 20
