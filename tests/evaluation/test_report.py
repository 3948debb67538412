"""The report page: every section, self-contained, rendered by a real browser; prediction extras."""

from __future__ import annotations

import pytest

import json
import shutil
from pathlib import Path

import numpy as np

from transferlab.pipeline import train

from ..conftest import render_page

SECTIONS = ["Summary", "Data", "Test metrics", "Most confused pairs", "Confusion matrix", "Training curves",
            "Calibration", "Top losses", "Random test predictions", "Label issues", "Do I need more data?"]


def test_report_has_every_section(trained_run):
    html = (trained_run.run_dir / "report.html").read_text()
    for heading in SECTIONS:
        assert f">{heading}<" in html, heading
    assert "Expected calibration error (ECE" in html and "macro avg" in html and "weighted avg" in html
    assert "http://" not in html and "https://" not in html


@pytest.mark.slow
def test_binary_report_has_roc_pr_and_threshold(photos_dir, tmp_path):
    res = train(photos_dir, tmp_path / "bin", mode="head", quiet=True, diagnose=False, image_size=96)
    html = (tmp_path / "bin" / "report.html").read_text()
    assert ">ROC and precision-recall<" in html
    assert "suggested_threshold" in res.metrics["binary"] and 0 <= res.metrics["binary"]["roc_auc"] <= 1


@pytest.mark.slow
def test_report_renders_in_headless_chromium(trained_run):
    n_images, loaded, errors, requests = render_page(trained_run.run_dir / "report.html")
    assert n_images >= 6 and loaded
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


@pytest.mark.slow
def test_threshold_marks_unknown_and_keeps_top_k(trained_run, capsys):
    from transferlab.cli import main

    folder = trained_run.run_dir.parent / "digits_in"
    if not folder.exists():
        folder.mkdir()
        import csv

        for r in list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[:10]:
            shutil.copy(r["path"], folder / Path(r["path"]).name)
    assert main(["predict", str(trained_run.model_dir), str(folder), "--threshold", "0.99", "--top-k", "3",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    unknown = [r for r in res if r["label"] == "unknown"]
    assert unknown and all(r["probability"] < 0.99 and len(r["predictions"]) == 3 for r in unknown)
    assert all(r["label"] != "unknown" for r in res if r["probability"] >= 0.99)


@pytest.mark.slow
def test_tta_and_no_calibration(trained_run):
    from transferlab.predict import load_model

    m = load_model(trained_run.model_dir)
    path = next(Path(trained_run.run_dir.parent).rglob("*.png"), None)
    import csv

    path = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[0]["path"]
    p, _ = m.predict_proba([path])
    q, _ = m.predict_proba([path], tta=True)
    r, _ = m.predict_proba([path], calibrated=False)
    assert abs(p.sum() - 1) < 1e-6 and abs(q.sum() - 1) < 1e-6
    # TTA is the mean of the image's and its mirror's probabilities (a digit is not symmetric)
    from PIL import Image, ImageOps

    mirror, _ = m.predict_proba([np.asarray(ImageOps.mirror(Image.open(path).convert("RGB")))])
    assert np.abs(q - (p + mirror) / 2).max() < 1e-3 and np.abs(q - p).max() > 1e-4
    assert p.argmax() == r.argmax()
    if m.temperature != 1.0:
        assert abs(p - r).max() > 0


@pytest.mark.slow
def test_explain_and_summary(trained_run, tmp_path, capsys):
    from transferlab.cli import main
    import csv

    path = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[0]["path"]
    assert main(["explain", str(trained_run.model_dir), path, "--out", str(tmp_path / "heat.png"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    from PIL import Image

    size = json.loads((trained_run.model_dir / "config.json").read_text())["preprocessing"]["size"]
    assert Image.open(tmp_path / "heat.png").size == (size, size) and res["label"] in [str(i) for i in range(10)]
    assert main(["summary", str(trained_run.model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"] == "efficientnet_lite0" and info["input_size"] == size == 224
    assert info["parameters_total"] > info["parameters_trainable"] > 0 and info["stages"] >= 5
