"""Know your data: label issues, relabelling, the learning curve, intervals, McNemar and run diffs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferlab.cli import main
from transferlab.errors import DataError

from ..conftest import render_page


def _flip_labels(src: Path, dst: Path, share: float, seed: int) -> set[str]:
    """Copy the class-folder dataset ``src`` to ``dst`` with ``share`` of its files moved to another
    class at random; returns the moved files' new paths."""
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*/*.png"))
    classes = sorted(p.name for p in dst.iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    flipped = set()
    for i in rng.choice(len(files), int(round(share * len(files))), replace=False):
        f = files[i]
        other = [c for c in classes if c != f.parent.name]
        target = dst / other[rng.integers(len(other))] / f.name
        f.rename(target)
        flipped.add(str(target.resolve()))
    return flipped


@pytest.mark.slow
def test_data_issues_ranks_flipped_labels_first(digits_dir, tmp_path, capsys):
    """5% of the real digits' labels flipped: at least 70% of them in the top 10% of the ranking (a random
    ranking puts 10% there); the CSV, the thumbnail page in Chromium and the CLI."""
    from transferlab.diagnostics import data_issues

    data = tmp_path / "noisy"
    flipped = _flip_labels(digits_dir, data, 0.05, seed=3)
    issues = data_issues(data, tmp_path / "out", quiet=True)
    order = issues.ranking()
    top = {str(Path(issues.samples[i].path).resolve()) for i in order[: int(np.ceil(0.1 * len(order)))]}
    hits = len(top & flipped)
    recall, precision = hits / len(flipped), hits / len(top)
    flagged = {str(Path(r["path"]).resolve()) for r in issues.rows if r["reason"].startswith("label")}
    with capsys.disabled():
        print(f"\nlabel issues on {len(order)} digits, {len(flipped)} flipped: top 10% recall {recall:.2f}, precision "
              f"{precision:.2f}; confident-learning flags {len(flagged)}, of which flipped {len(flagged & flipped)}")
    assert recall >= 0.7
    assert len(flagged & flipped) >= 0.5 * len(flipped)
    with open(tmp_path / "out" / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "given_label", "suggested_label", "score", "reason", "accept"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    n_images, loaded, errors, requests = render_page(tmp_path / "out" / "label_issues.html")
    assert n_images == len(rows) and loaded and errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests)
    assert main(["data", "issues", str(data), "--out", str(tmp_path / "cli"), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["images"] == len(order) and len(out["rows"]) == len(rows)


def test_relabel_dry_run_apply_and_never_overwrite(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "cat" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(root / "dog" / "a.png")  # the same name in the target class
    Image.new("RGB", (8, 8), "green").save(root / "cat" / "b.png")
    issues = tmp_path / "label_issues.csv"
    issues.write_text("path,given_label,suggested_label,score,reason,accept\n"
                      f"{root / 'cat' / 'a.png'},cat,dog,0.9,label,yes\n"
                      f"{root / 'cat' / 'b.png'},cat,dog,0.8,label,\n"
                      f"{root / 'cat' / 'b.png'},cat,../../etc,0.7,label,yes\n")
    assert main(["data", "relabel", str(root), str(issues)]) == 0
    assert "dry run: 1 change(s)" in capsys.readouterr().out
    assert (root / "cat" / "a.png").exists()  # nothing moved
    assert main(["data", "relabel", str(root), str(issues), "--apply"]) == 0
    assert not (root / "cat" / "a.png").exists() and (root / "cat" / "b.png").exists()
    moved = root / "dog" / "a-relabelled-1.png"
    assert moved.exists() and Image.open(moved).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(root / "dog" / "a.png").getpixel((0, 0)) == (0, 0, 255)  # never overwritten
    log = (tmp_path / "relabel_log.csv").read_text()
    assert str(moved) in log
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{root / 'cat' / 'b.png'},cat\n")
    (tmp_path / "all.csv").write_text("path,given_label,suggested_label,score,reason,accept\n"
                                      f"{root / 'cat' / 'b.png'},cat,dog,0.8,label,\n")
    assert main(["data", "relabel", str(manifest), str(tmp_path / "all.csv"), "--all", "--apply"]) == 0
    assert manifest.read_text().endswith(",cat\n")  # the original is kept
    assert (tmp_path / "m.relabelled.csv").read_text().strip().endswith(",dog")


@pytest.mark.slow
def test_learning_curve_and_report_sections(trained_run, digits_dir, tmp_path, capsys):
    m = trained_run.metrics
    curve = m["learning_curve"]
    assert curve["fractions"] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert curve["n_train"] == sorted(curve["n_train"]) and curve["accuracy"][-1] > curve["accuracy"][0]
    assert set(curve["projection"]["overall"]) >= {"now", "2x", "4x"}
    assert curve["projection"]["overall"]["4x"] >= curve["projection"]["overall"]["2x"] >= curve["accuracy"][-1]
    assert curve["sentences"][0].startswith("Doubling the training images")
    assert m["label_issues"]["images"] == m["n_images"]["train"]
    assert (trained_run.run_dir / "label_issues.csv").is_file() and (trained_run.run_dir / "label_issues.html").is_file()
    html = (trained_run.run_dir / "report.html").read_text()
    assert "alt='learning curve'" in html and "label_issues.html" in html
    assert main(["data", "curve", str(digits_dir), "--out", str(tmp_path), "--seeds", "2", "-q"]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert "computed in" in out and (tmp_path / "learning_curve.png").stat().st_size > 1000


def test_label_issues_need_two_images_per_class():
    from transferlab.data.scan import Sample
    from transferlab.diagnostics import find_label_issues

    samples = [Sample(f"/x/{i}.png", "a" if i else "b") for i in range(6)]
    with pytest.raises(DataError, match="at least two images in every class"):
        find_label_issues(samples, np.random.default_rng(0).normal(size=(6, 4)), ["a", "b"])


def test_intervals_in_metrics(trained_run):
    test = trained_run.metrics["test"]
    lo, hi = test["accuracy_ci"]
    assert lo < test["accuracy"] < hi or test["accuracy"] in (lo, hi)
    assert test["macro_f1_ci"][0] <= test["macro_f1"] <= test["macro_f1_ci"][1]
    for row in test["per_class"].values():
        for key in ("precision", "recall", "f1"):
            assert row[f"{key}_ci"][0] <= row[key] + 1e-9 and row[key] <= row[f"{key}_ci"][1] + 1e-9
    html = (trained_run.run_dir / "report.html").read_text()
    assert "95% intervals" in html and "cannot be told apart" in html  # 30 test images


def test_wilson_bootstrap_and_mcnemar():
    from transferlab.evaluation.stats import bootstrap_f1, mcnemar, paired_difference_interval, wilson_interval

    lo, hi = wilson_interval(90, 100)
    assert abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    pred = np.where(rng.random(3000) < 0.8, y, rng.integers(0, 3, 3000))
    (mlo, mhi), per = bootstrap_f1(y, pred, 3)
    (slo, shi), _ = bootstrap_f1(y[:300], pred[:300], 3)
    assert mlo < mhi and (mhi - mlo) < (shi - slo)  # ten times the images, a narrower interval
    a = np.array([True] * 10 + [True] * 50)
    b = np.array([False] * 10 + [True] * 50)
    res = mcnemar(a, b)
    assert res["only_a_right"] == 10 and abs(res["p_value"] - 2 * 0.5 ** 10) < 1e-12
    assert mcnemar(a, a)["p_value"] == 1.0
    lo, hi = paired_difference_interval(a, b)
    assert -1 <= lo < hi < 0


def _fake_run(root: Path, preds: list[tuple[str, str, str]]) -> Path:
    root.mkdir(parents=True)
    with open(root / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true_label", "predicted_label", "probability", "p_a", "p_b"])
        for path, true, pred in preds:
            w.writerow([path, true, pred, 0.9, 0.9 if pred == "a" else 0.1, 0.9 if pred == "b" else 0.1])
    return root


def test_diff_lists_fixed_and_broken(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8), "white").save(img)
    paths = [str(img)] + [f"/data/{i}.png" for i in range(1, 40)]
    truth = ["a" if i % 2 else "b" for i in range(40)]
    pa = list(truth)
    pb = list(truth)
    pa[0] = "a"  # A wrong, B right: fixed
    pb[1] = "b"  # A right, B wrong: broken
    for i in range(2, 12):
        pa[i] = "a" if truth[i] == "b" else "b"  # A wrong on ten more, B right: fixed
    run_a = _fake_run(tmp_path / "A", list(zip(paths, truth, pa)))
    run_b = _fake_run(tmp_path / "B", list(zip(paths, truth, pb)))
    assert main(["diff", str(run_a), str(run_b), "--out", str(tmp_path / "d"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    kinds = {r["path"]: r["change"] for r in d["changed"]}
    assert kinds[paths[0]] == "fixed" and kinds[paths[1]] == "broken" and len(kinds) == 12
    assert d["mcnemar"]["only_b_right"] == 11 and d["mcnemar"]["p_value"] < 0.01
    assert sum(c["fixed"] for c in d["per_class"]) == 11
    assert d["difference_ci"][0] > 0
    page = (tmp_path / "d" / "diff.html").read_text()
    assert "fixed by B" in page and "broken by B" in page and "data:image/jpeg;base64" in page
    with pytest.raises(DataError, match="share no test image"):
        from transferlab.evaluation.diff import diff_runs

        diff_runs(run_a, _fake_run(tmp_path / "C", [("/other.png", "a", "a")]))


def test_compare_mcnemar_against_best(tmp_path):
    from transferlab.compare import _paired_tests

    paths = [f"/d/{i}.png" for i in range(60)]
    truth = ["a"] * 60
    _fake_run(tmp_path / "good", [(p, t, "a") for p, t in zip(paths, truth)])
    _fake_run(tmp_path / "bad", [(p, t, "a" if i >= 20 else "b") for i, (p, t) in enumerate(zip(paths, truth))])
    _fake_run(tmp_path / "close", [(p, t, "a" if i else "b") for i, (p, t) in enumerate(zip(paths, truth))])
    rows = [{"backbone": n, "status": "ok", "accuracy": acc} for n, acc in (("bad", 40 / 60), ("good", 1.0),
                                                                            ("close", 59 / 60))]
    _paired_tests(tmp_path, rows)
    by = {r["backbone"]: r for r in rows}
    assert by["good"]["p_vs_best"] is None
    assert by["bad"]["p_vs_best"] < 1e-4 and by["close"]["p_vs_best"] == 1.0


def _subset(src: Path, dst: Path, classes: list[str]) -> Path:
    for c in classes:
        shutil.copytree(src / c, dst / c)
    return dst


@pytest.mark.slow
def test_knn_mode_add_and_remove_class(digits_dir, tmp_path, capsys):
    """A nearest-prototype model on eight digits; the ninth added in seconds, then removed again."""
    from transferlab.pipeline import train
    from transferlab.predict import load_model

    data = _subset(digits_dir, tmp_path / "eight", [str(i) for i in range(8)])
    res = train(data, tmp_path / "knn", mode="knn", quiet=True, diagnose=False, image_size=64)
    cfg = json.loads((res.model_dir / "config.json").read_text())
    assert cfg["head"]["kind"] == "prototypes" and cfg["head"]["scale"] > 0
    assert res.metrics["test"]["accuracy"] > 0.6  # eight classes: chance is 0.125
    nines = sorted(str(p) for p in (digits_dir / "9").glob("*.png"))
    others = sorted(str(p) for p in (data / "3").glob("*.png"))[:5]
    before = load_model(res.model_dir).predict_proba(others)[0]
    assert main(["add-class", str(res.model_dir), str(digits_dir / "9"), "-q"]) == 0
    assert "added: prototype of 20 image(s)" in capsys.readouterr().out
    model = load_model(res.model_dir)
    assert model.classes[-1] == "9" and len(model.classes) == 9
    assert np.mean([r.label == "9" for r in model.predict(nines)]) >= 0.6  # its own images: mostly itself
    assert list(res.model_dir.parent.glob("model.bak-*"))
    assert main(["remove-class", str(res.model_dir), "9"]) == 0
    after = load_model(res.model_dir).predict_proba(others)[0]
    np.testing.assert_allclose(after, before, atol=1e-5)  # the other classes' scores are as before
    assert main(["remove-class", str(res.model_dir), "nope"]) != 0  # a clear error, no traceback


@pytest.mark.slow
def test_add_class_refits_a_linear_head(digits_dir, tmp_path):
    from transferlab.classes import add_class
    from transferlab.pipeline import train
    from transferlab.predict import load_model

    data = _subset(digits_dir, tmp_path / "eight", [str(i) for i in range(8)])
    res = train(data, tmp_path / "head", mode="head", quiet=True, diagnose=False, image_size=64)
    change = add_class(res.model_dir, digits_dir / "9", quiet=True)
    assert change.classes[-1] == "9" and "refitted" in change.how and change.val_accuracy > 0.5
    cfg = json.loads((res.model_dir / "config.json").read_text())
    assert cfg["metrics"]["test_accuracy"] is None and "added by add-class" in cfg["metrics"]["note"]
    model = load_model(res.model_dir)
    nines = sorted(str(p) for p in (digits_dir / "9").glob("*.png"))
    assert np.mean([r.label == "9" for r in model.predict(nines)]) >= 0.6
    with pytest.raises(Exception, match="already a class"):
        add_class(res.model_dir, digits_dir / "9", quiet=True)


@pytest.mark.slow
def test_open_set_unknown_in_predict_and_serve(trained_run, tmp_path, capsys):
    """The digits model calls real photographs 'unknown' with --open-set, keeps most digits, and serves
    the same decision; the scorer lives in the artifact, calibrated to accept 95% of validation."""
    from fastapi.testclient import TestClient

    from transferlab.service import create_app

    from ..conftest import photo_crops

    m = trained_run.metrics["open_set"]
    assert m["method"] == "knn" and m["accept"] == 0.95 and 0 < m["test_accepted"] <= 1
    assert (trained_run.model_dir / "openset.safetensors").is_file()
    photos = []
    for name in ("astronaut", "coffee", "rocket"):
        for i, im in enumerate(photo_crops(name, 2, seed=5)):
            photos.append(tmp_path / f"{name}{i}.jpg")
            im.save(photos[-1])
    with open(trained_run.run_dir / "predictions.csv", newline="") as f:
        digits = [r["path"] for r in csv.DictReader(f)]
    assert main(["predict", str(trained_run.model_dir), *map(str, photos), *digits, "--open-set", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    unknown = [r["label"] == "unknown" for r in res]
    assert all(unknown[: len(photos)]), res[: len(photos)]
    assert np.mean(unknown[len(photos):]) <= 0.25 and all("ood_score" in r for r in res)
    assert main(["predict", str(trained_run.model_dir), str(photos[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] != "unknown"  # off unless asked
    with TestClient(create_app(trained_run.model_dir, open_set=True)) as c:
        r = c.post("/predict", files={"file": ("p.jpg", photos[0].read_bytes(), "image/jpeg")}).json()
        assert r["label"] == "unknown" and r["ood_score"] > trained_run.metrics["open_set"]["threshold"]
        r = c.post("/predict", files={"file": ("d.png", Path(digits[0]).read_bytes(), "image/png")}).json()
        assert "ood_score" in r
