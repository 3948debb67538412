"""Several processes share one run: each extracts its share of the images and all get the gathered
features, rank 0 fits the head once, evaluation and prediction run in shares, and rank 0 alone writes;
a feature cache that several processes fill at once stays whole, and a damaged entry is never used."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.distributed import SINGLE, World, launch_layout, owners, share
from transferlab.pipeline import train
from transferlab.predict import expand_paths, load_model, write_predictions

from .conftest import free_port

AUDIT = Path(__file__).parent / "audit"  # its sitecustomize records what each process writes
ARGS = ["--image-size", "64", "--workers", "0", "--ft-batch-size", "16", "--seed", "3", "-q"]


@contextlib.contextmanager
def _one_thread():
    """This process computes with one thread (torch's and the BLAS's), as each rank does
    (``OMP_NUM_THREADS=1``), so that the features compare bit for bit on any machine, whatever its cores."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def _same(a, b) -> bool:
    """Equal, numbers to 1e-9 (the head's float64 fit may sum in another order than in another process)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True)
    return a == b


def _run(argv: list[str], watched: Path, log: Path, launcher: list[str] | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """``transferlab ARGV`` (under ``launcher``, e.g. torchrun), every process's writes under ``watched``
    recorded in ``log``."""
    log.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")])
    full = {**os.environ, "PYTHONPATH": path, "TL_AUDIT_DIR": str(watched), "TL_AUDIT_LOG": str(log),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, *(launcher or []), "-m", "transferlab.cli", *argv]
    p = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _writes_by_rank(log: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for f in log.glob("*.json"):
        rec = json.loads(f.read_text())
        out.setdefault(rec["rank"], []).extend(path for _, path in rec["writes"])
    return out


def _check_only_rank_zero_wrote(log: Path, expected: str) -> None:
    writes = _writes_by_rank(log)
    assert any(p.endswith(expected) for p in writes.get(0, [])), writes.get(0)  # the recorder works
    assert not [p for rank, paths in writes.items() if rank != 0 for p in paths], writes


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(next(model_dir.glob("*.safetensors"))))


def test_shares_are_disjoint_blocks_that_cover_every_index():
    world = World(0, 3)
    shares = owners(10, world, block=2)
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5]]
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert share(10, SINGLE, block=4) == list(range(10))
    assert owners(1, World(0, 2), block=32) == [[0], []]


def test_launch_layout_follows_torchrun_and_slurm(monkeypatch):
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert launch_layout(1, 1) == (1, 1)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_layout(1, 1) == (4, 2)
    assert launch_layout(2, 1) == (2, 1)  # what the user asked for wins
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    assert launch_layout(1, 1) == (2, 3)


@pytest.fixture(scope="module")
def single_head_run(digits_dir, tmp_path_factory):
    """The one-process head run the two-process runs must reproduce."""
    out = tmp_path_factory.mktemp("one") / "run"
    with _one_thread():
        return train(digits_dir, out, mode="head", image_size=64, workers=0, seed=3, quiet=True, no_cache=True)


def _features(digits_dir: Path, paths: list[str], cache_dir: Path | None = None):
    from transferlab.backbones import create_backbone
    from transferlab.features.cache import FeatureCache
    from transferlab.features.extract import FeatureExtractor

    backbone, info = create_backbone("efficientnet_lite0", image_size=64)
    extractor = FeatureExtractor(backbone, info, workers=0, quiet=True)
    with _one_thread():
        return extractor, extractor.extract(paths, FeatureCache(cache_dir) if cache_dir else None)


@pytest.mark.slow
def test_head_run_over_two_processes_equals_the_one_process_run(digits_dir, tmp_path, single_head_run):
    run, cache = tmp_path / "two", tmp_path / "cache"
    _run(["train", str(digits_dir), "--out", str(run), "--mode", "head", "--devices", "2", "--strategy", "ddp",
          "--accelerator", "cpu", "--cache-dir", str(cache), *ARGS], run, tmp_path / "writes")
    m = json.loads((run / "metrics.json").read_text())
    one = single_head_run.metrics
    n = sum(one["n_images"].values())
    dist = m["distributed"]
    assert dist["world_size"] == 2 and sum(dist["extracted_per_rank"]) == n and min(dist["extracted_per_rank"]) > 0
    assert sum(dist["evaluated_per_rank"]) == one["n_images"]["val"] + one["n_images"]["test"]
    assert one["distributed"] == {"world_size": 1, "extracted_per_rank": [n],
                                  "evaluated_per_rank": [one["n_images"]["val"] + one["n_images"]["test"]]}
    # each rank cached the features of its share: together, every image's, equal to one process's
    paths = [r["path"] for r in csv.DictReader((run / "split.csv").open())]
    extractor, alone = _features(digits_dir, paths)
    _, shared = _features(digits_dir, paths, cache)
    assert shared.cached == n and shared.computed == 0
    assert np.array_equal(shared.features, alone.features)
    # the head fitted once on the gathered features is the one process's, and so is every test metric
    a, b = _weights(single_head_run.model_dir), _weights(run / "model")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert _same(m["test"], one["test"]) and _same(m["val"], one["val"])
    assert m["test"]["accuracy"] == one["test"]["accuracy"]
    _check_only_rank_zero_wrote(tmp_path / "writes", "metrics.json")


@pytest.mark.slow
def test_auto_run_over_two_processes_shares_extraction_and_starts_from_one_head(digits_dir, tmp_path,
                                                                                single_head_run):
    run = tmp_path / "two"
    _run(["train", str(digits_dir), "--out", str(run), "--mode", "auto", "--ft-epochs", "1", "--devices", "2",
          "--strategy", "ddp", "--accelerator", "cpu", "--no-cache", "--time-limit", "10m", *ARGS],
         run, tmp_path / "writes")
    m = json.loads((run / "metrics.json").read_text())
    n = sum(m["n_images"].values())
    assert m["distributed"]["world_size"] == 2 and sum(m["distributed"]["extracted_per_rank"]) == n
    assert min(m["distributed"]["extracted_per_rank"]) > 0
    rows = list(csv.DictReader((run / "logs" / "history.csv").open()))
    alone = list(csv.DictReader((single_head_run.run_dir / "logs" / "history.csv").open()))
    keys = ("epoch", "train_loss", "val_loss", "val_acc")
    assert _same([{k: float(r[k]) for k in keys} for r in rows if r["phase"] == "head"],
                 [{k: float(r[k]) for k in keys} for r in alone])
    # one fine-tuning epoch ran under DDP and ended on both ranks (the deadline's decision is rank 0's)
    assert len([r for r in rows if r["phase"] == "finetune"]) == 1 and m["finetune"]["epochs_run"] == 1
    if not m["finetune"]["kept"]:  # the head was kept: it is the one-process head, with its metrics
        a, b = _weights(single_head_run.model_dir), _weights(run / "model")
        assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
        assert _same(m["test"], single_head_run.metrics["test"])
    # whichever model was kept, the test predictions recorded are the saved model's
    test = list(csv.DictReader((run / "predictions.csv").open()))
    with _one_thread():
        saved = load_model(run / "model").predict([r["path"] for r in test], top_k=1)
    assert len(test) == m["n_images"]["test"] and [p.label for p in saved] == [r["predicted_label"] for r in test]
    _check_only_rank_zero_wrote(tmp_path / "writes", "metrics.json")


def test_shared_evaluation_puts_every_share_back_in_the_files_order(monkeypatch):
    """predict_proba_shared on each of two ranks, their gathers answered with what each computed."""
    from transferlab import sharing

    class Fake:
        batch_size = 2
        engine = "torch"

        def predict_proba(self, paths, **_):
            return np.array([[float(p), -float(p)] for p in paths]), [None if int(p) % 3 else f"bad {p}" for p in paths]

    paths = [str(i) for i in range(7)]
    world = [World(0, 2), World(1, 2)]
    parts = [Fake().predict_proba([paths[i] for i in share(7, w, 2)]) for w in world]
    monkeypatch.setattr(sharing, "all_gather_rows", lambda w, rows: [np.asarray(p[0]) for p in parts])
    monkeypatch.setattr(sharing, "all_gather_json",
                        lambda w, obj: [obj, obj] if isinstance(obj, str) else [list(p[1]) for p in parts])
    for w in world:
        probs, errors = sharing.predict_proba_shared(Fake(), paths, w)
        assert probs[:, 0].tolist() == [float(i) for i in range(7)]
        assert errors == [f"bad {i}" if i % 3 == 0 else None for i in range(7)]


@pytest.mark.slow
def test_predict_under_torchrun_writes_one_file_equal_to_one_process(trained_run, digits_dir, tmp_path):
    model = str(trained_run.model_dir)
    out = tmp_path / "out"
    out.mkdir()
    one, two = out / "one.csv", out / "two.csv"
    with _one_thread():  # what one process writes
        write_predictions(load_model(model).predict(expand_paths([digits_dir]), top_k=3), one)
    _run(["predict", model, str(digits_dir), "-o", str(two)], out, tmp_path / "writes",
         launcher=["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())])
    assert two.read_text() == one.read_text()
    assert len(two.read_text().splitlines()) == 1 + len(list(digits_dir.rglob("*.png")))
    _check_only_rank_zero_wrote(tmp_path / "writes", "two.csv")


_FILL = """
import sys
from transferlab.backbones import create_backbone
from transferlab.features.cache import FeatureCache
from transferlab.features.extract import FeatureExtractor
backbone, info = create_backbone("efficientnet_lite0", image_size=64)
paths = sys.argv[2:]
ext = FeatureExtractor(backbone, info, workers=0, quiet=True).extract(paths, FeatureCache(sys.argv[1]))
assert ext.ok.all()
"""


@pytest.mark.slow
def test_two_processes_fill_one_cache_at_once_and_damage_is_recomputed(digits_dir, tmp_path, caplog):
    from transferlab.features.cache import FeatureCache

    paths = sorted(str(p) for p in digits_dir.rglob("*.png"))[:96]
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _FILL, str(cache), *paths], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    extractor, alone = _features(digits_dir, paths)
    ns = FeatureCache(cache).namespace(extractor.description())
    shards = sorted(ns.dir.glob("shard-*.safetensors"))
    assert len(shards) >= 3 and not list(ns.dir.glob(".*.tmp"))  # both wrote their batches; no temporary left
    _, read = _features(digits_dir, paths, cache)
    assert read.cached == len(paths) and read.computed == 0
    assert np.allclose(read.features, alone.features, atol=1e-5)
    # damage: bytes flipped inside one shard's features, another cut short, a writer killed mid-write
    data = bytearray(shards[0].read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 2])
    (ns.dir / ".shard-killed.safetensors.123.tmp").write_bytes(shards[2].read_bytes()[:100])
    ns.index(refresh=True)
    # every image of the damaged shards is computed again (those both processes wrote may be read from the other)
    logger = logging.getLogger("transferlab")
    logger.addHandler(caplog.handler)  # the CLI's logging set-up may have stopped propagation in this process
    try:
        _, again = _features(digits_dir, paths, cache)
    finally:
        logger.removeHandler(caplog.handler)
    assert again.ok.all() and again.computed > 0 and again.cached + again.computed == len(paths)
    assert np.allclose(again.features, alone.features, atol=1e-5)
    assert "damaged shard" in caplog.text and not shards[0].exists() and not shards[1].exists()
    _, healed = _features(digits_dir, paths, cache)
    assert healed.computed == 0 and np.allclose(healed.features, alone.features, atol=1e-5)


def test_every_rank_runs_rank_zeros_engine(monkeypatch):
    """Two ranks whose own measurements chose different engines: both end on rank 0's."""
    from transferlab import sharing

    class Fake:
        def __init__(self, engine):
            self.engine, self.reason = engine, ""

        def use_engine(self, name, reason):
            self.engine, self.reason = name, reason

    ranks = [Fake("onnxruntime"), Fake("torch")]
    monkeypatch.setattr(sharing, "all_gather_json", lambda w, obj: [ranks[0].engine, ranks[1].engine])
    for w, fake in zip((World(0, 2), World(1, 2)), ranks):
        sharing.agree_engine(fake, w)
    assert [f.engine for f in ranks] == ["onnxruntime", "onnxruntime"] and ranks[1].reason == "rank 0's choice"
