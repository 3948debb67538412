"""Multi-label classification: data layouts, iterative stratification, the sigmoid head and its thresholds,
and a trained model through predict, serve, export and evaluate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data.scan import Sample, scan
from transferlab.data.split import iterative_split, split_dataset
from transferlab.training.multilabel import label_matrix, tune_thresholds

DIGITS = 5  # labels d0..d4


def _canvas(tiles: list[np.ndarray]) -> Image.Image:
    """Up to two 8x8 digits side by side on a 32x64 canvas (each digit scaled 4x)."""
    canvas = np.zeros((32, 64), np.float32)
    for j, tile in enumerate(tiles):
        canvas[:, j * 32:(j + 1) * 32] = np.kron(tile, np.ones((4, 4)))
    return Image.fromarray((canvas / 16 * 255).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def multilabel_manifest(tmp_path_factory) -> Path:
    """Real scikit-learn digits composited one or two to a canvas; labels = the digits present (a few blank
    canvases have no label). ``path,labels`` with ``;`` between labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < DIGITS
    images, targets = d.images[keep], d.target[keep]
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("multilabel")
    rows = []
    for i in range(260):
        k = 0 if i % 25 == 0 else int(rng.choice([1, 2, 2]))
        idx = rng.choice(len(images), size=k, replace=False)
        while k == 2 and targets[idx[0]] == targets[idx[1]]:
            idx = rng.choice(len(images), size=k, replace=False)
        name = f"c{i:03d}.png"
        _canvas([images[t] for t in idx]).save(root / name)
        rows.append([name, ";".join(sorted(f"d{targets[t]}" for t in idx))])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    return root / "labels.csv"


def test_manifest_is_read_as_multilabel_and_split_keeps_every_label_in_every_split(multilabel_manifest):
    ds = scan(multilabel_manifest)
    assert ds.task == "multilabel" and ds.classes == [f"d{i}" for i in range(DIGITS)]
    assert any(len(s.labels) == 2 for s in ds.samples) and any(s.labels == () for s in ds.samples)
    ds = split_dataset(ds, 0.15, 0.15, seed=0)
    for label, per_split in ds.counts().items():
        n = sum(per_split.values())
        for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(per_split.get(split, 0) - share * n) <= max(2, 0.05 * n), (label, per_split)


def test_iterative_split_places_a_rare_label_in_each_split():
    """Seven images of a rare label among 300: each split gets its share (a random split often leaves
    val or test without one)."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(300):
        labels = {"common"} if rng.random() < 0.6 else set()
        if i % 43 == 0:
            labels.add("rare")
        samples.append(Sample(f"/x/{i:03d}.png", ";".join(sorted(labels))))
    out = iterative_split(samples, 0.15, 0.15, seed=3)
    rare = [s.split for s in out if "rare" in s.labels]
    assert len(rare) == 7 and {rare.count("val"), rare.count("test")} == {1} and rare.count("train") == 5
    sizes = {sp: sum(s.split == sp for s in out) for sp in ("train", "val", "test")}
    assert abs(sizes["val"] - 45) <= 2 and abs(sizes["test"] - 45) <= 2
    assert [s.split for s in iterative_split(samples, 0.15, 0.15, seed=3)] == [s.split for s in out]


def test_same_image_in_several_class_folders_is_one_multilabel_image(tmp_path, multilabel_manifest):
    src = sorted(multilabel_manifest.parent.glob("c*.png"))
    for label, files in (("cat", src[:4]), ("dog", src[2:6])):
        (tmp_path / label).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / label / f.name)
    ds = scan(tmp_path, task="multilabel")
    assert ds.task == "multilabel" and len(ds.samples) == 6
    assert sorted(len(s.labels) for s in ds.samples) == [1, 1, 1, 1, 2, 2]
    assert scan(tmp_path).task == "single" and len(scan(tmp_path).samples) == 8  # only when asked


def test_thresholds_maximise_each_labels_f1():
    probs = np.array([[0.9, 0.2], [0.6, 0.3], [0.4, 0.8], [0.1, 0.7]])
    y = label_matrix([["a"], ["a", "b"], [], ["b"]], ["a", "b"])
    t = tune_thresholds(probs, y)
    assert t[0] == pytest.approx(0.6) and t[1] == pytest.approx(0.3)
    assert tune_thresholds(probs, np.zeros_like(y))[0] == 0.5  # no positive to tune on


def _f1_at(probs: np.ndarray, y: np.ndarray, cut) -> np.ndarray:
    pred = probs >= cut
    tp = (pred & (y == 1)).sum(0)
    return 2 * tp / np.maximum(pred.sum(0) + y.sum(0), 1)


@pytest.mark.slow
def test_multilabel_model_trains_predicts_serves_exports_and_evaluates(tmp_path, multilabel_manifest):
    from fastapi.testclient import TestClient

    from transferlab.evaluate import evaluate
    from transferlab.export import export_model
    from transferlab.pipeline import train
    from transferlab.predict import load_model
    from transferlab.service.app import create_app

    res = train(multilabel_manifest, tmp_path / "run", mode="auto", ft_epochs=1, image_size=64, quiet=True)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    classes = [f"d{i}" for i in range(DIGITS)]
    test = m["test"]
    assert m["task"] == "multilabel" and m["plan"]["task"] == "multilabel"
    assert m["finetune"]["validations"], "the fine-tuning phase (binary cross-entropy) ran"
    prevalence = test["label_cardinality"] / DIGITS
    assert test["mAP"] > prevalence + 0.25, (test["mAP"], prevalence)  # chance AP is the prevalence
    assert set(test["per_label"]) == set(classes)
    assert all(0 <= v["f1"] <= 1 and v["support"] > 0 and v["ap"] is not None for v in test["per_label"].values())
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "label_cardinality"):
        assert test[key] is not None
    assert (res.run_dir / "pr_curves.png").stat().st_size > 0
    assert "Precision-recall curves" in (res.run_dir / "report.html").read_text()

    # thresholds: stored in the artifact, one per label, tuned on the validation split
    cfg = json.loads((res.model_dir / "config.json").read_text())
    thr = np.asarray(cfg["thresholds"])
    assert cfg["task"] == "multilabel" and len(thr) == DIGITS and not np.allclose(thr, 0.5)
    assert list(m["thresholds"].values()) == pytest.approx(list(thr))
    rows = list(csv.DictReader(open(res.run_dir / "split.csv")))
    val = [r for r in rows if r["split"] == "val"]
    predictor = load_model(res.model_dir)  # the engine its thresholds were tuned through
    p_val, _ = predictor.predict_proba([r["path"] for r in val])
    y_val = label_matrix([r["labels"].split(";") if r["labels"] else [] for r in val], classes)
    assert np.all(_f1_at(p_val, y_val, thr) >= _f1_at(p_val, y_val, 0.5) - 0.02)

    # predict: every label at or above its threshold; --threshold overrides them all
    test_rows = [r for r in rows if r["split"] == "test"]
    preds = predictor.predict([r["path"] for r in test_rows])
    assert all(p.labels is not None and p.label == ";".join(p.labels) for p in preds)
    assert any(len(p.labels) == 2 for p in preds)
    y_test = label_matrix([r["labels"].split(";") if r["labels"] else [] for r in test_rows], classes)
    got = label_matrix([p.labels for p in preds], classes)
    micro = 2 * (got * y_test).sum() / (got.sum() + y_test.sum())
    assert micro == pytest.approx(test["micro_f1"], abs=0.05)
    assert predictor.predict([test_rows[0]["path"]], threshold=0.0)[0].labels == classes
    assert predictor.predict([test_rows[0]["path"]], threshold=1.0)[0].labels == []

    # serve: the labels above threshold, each prediction with its threshold
    two = next(r["path"] for r in test_rows if ";" in r["labels"])
    with TestClient(create_app(res.model_dir)) as client:
        body = client.post("/predict", files={"file": ("x.png", Path(two).read_bytes(), "image/png")}).json()
    assert body["labels"] == predictor.predict([two])[0].labels
    assert all("threshold" in p and "on" in p for p in body["predictions"])
    assert {p["label"] for p in body["predictions"] if p["on"]} == set(body["labels"])

    # export: the ONNX file computes sigmoids and carries the thresholds; same decisions as PyTorch
    check = export_model(res.model_dir, "onnx")
    assert check["passed"] and check["top1_agreement"] == 1.0
    onnx = load_model(res.model_dir / "model.onnx")
    assert onnx.multilabel and list(onnx.thresholds) == pytest.approx(list(thr))
    p_onnx, _ = onnx.predict_proba([two])
    p_fp32, _ = load_model(res.model_dir, engine="torch", mixed_precision=False).predict_proba([two])
    assert np.abs(p_onnx - p_fp32).max() < 1e-4

    # evaluate: the saved model on the labelled manifest
    ev = evaluate(res.model_dir, multilabel_manifest, tmp_path / "eval")
    assert ev["task"] == "multilabel" and ev["test"]["n"] == 260 and ev["test"]["mAP"] > prevalence + 0.25


def test_multilabel_refuses_options_without_a_meaning(tmp_path, multilabel_manifest):
    from transferlab.errors import ConfigError
    from transferlab.pipeline import train

    with pytest.raises(ConfigError, match="knn"):
        train(multilabel_manifest, tmp_path / "knn", mode="knn", quiet=True, image_size=64)
    with pytest.raises(ConfigError, match="--candidates"):  # the race ranks recipes by single-label accuracy
        train(multilabel_manifest, tmp_path / "race", candidates=("recipe", "orient"), quiet=True, image_size=64)
    assert not (tmp_path / "race").exists()  # refused before anything was written
