"""The whole head-mode pipeline: cache, run directory, metrics, artifact and prediction."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from transferlab.artifacts import load_artifact
from transferlab.errors import ArtifactError
from transferlab.features import FeatureCache, FeatureExtractor
from transferlab.evaluate import evaluate
from transferlab.pipeline import train
from transferlab.predict import load_model

from .conftest import photo_crops

RUN_FILES = ["split.csv", "skipped.csv", "metrics.json", "report.html", "curves.png", "confusion_matrix.png",
             "predictions.csv", "logs/history.csv", "model/model.safetensors", "model/config.json"]


def test_run_directory_and_metrics_keys(trained_run):
    run = trained_run.run_dir
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "top_k_accuracy", "per_class", "confusion_matrix", "labels"):
            assert key in m[split]
        assert set(m[split]["per_class"]["3"]) == {"precision", "recall", "f1", "support", "precision_ci",
                                                    "recall_ci", "f1_ci"}
    assert set(m["timing"]) >= {"extract_s", "train_s", "total_s"}
    assert m["backbone"] == "efficientnet_lite0"
    assert sum(m["n_images"].values()) == 200
    assert m["test"]["accuracy"] > 0.5  # 10 digit classes from 14 training images each: far above chance
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    hist = list(csv.DictReader(open(run / "logs" / "history.csv")))
    assert len(hist) >= 2 and float(hist[-1]["train_loss"]) < float(hist[0]["train_loss"])


@pytest.mark.slow
def test_second_run_hits_cache_without_forward(digits_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # knn: no head to fit, this test is about the cache
    first = train(digits_dir, tmp_path / "r1", mode="knn", quiet=True, diagnose=False, cache_dir=str(cache),
                  image_size=64)
    calls = []
    original = FeatureExtractor.forward
    monkeypatch.setattr(FeatureExtractor, "forward", lambda self, b: calls.append(len(b)) or original(self, b))
    second = train(digits_dir, tmp_path / "r2", mode="knn", quiet=True, diagnose=False, cache_dir=str(cache),
                   image_size=64)
    assert calls == []
    t1, t2 = first.metrics["timing"], second.metrics["timing"]
    assert t1["features_computed"] == 200 and t1["features_cached"] == 0
    assert t2["features_computed"] == 0 and t2["features_cached"] == 200


@pytest.mark.slow
def test_changed_file_is_recomputed_and_partial_extraction_resumes(digits_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    cache = FeatureCache(tmp_path / "cache")
    from transferlab.backbones import create_backbone

    bb, info = create_backbone("efficientnet_lite0")
    ex = FeatureExtractor(bb, info, batch_size=16, workers=0, quiet=True)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    original = FeatureExtractor.forward
    state = {"n": 0}

    def dying(self, batch):
        state["n"] += 1
        if state["n"] == 4:
            raise KeyboardInterrupt("killed half way")
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(paths, cache)
    monkeypatch.setattr(FeatureExtractor, "forward", original)
    resumed = ex.extract(paths, cache)
    assert resumed.cached == 48 and resumed.computed == len(paths) - 48
    photo_crops("coffee", 1)[0].resize((64, 64)).save(paths[0])  # change one file's content
    again = ex.extract(paths, cache)
    assert again.computed == 1 and again.cached == len(paths) - 1
    assert cache.info()[0].entries == len(paths) + 1


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_bad_files_are_reported_with_or_without_a_cache(digits_dir, tmp_path, cached):
    from transferlab.backbones import create_backbone

    good = sorted(str(p) for p in digits_dir.rglob("*.png"))[:3]
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    paths = [good[0], str(tmp_path / "missing.png"), good[1], str(tmp_path / "broken.png"), good[2]]
    ex = FeatureExtractor(*create_backbone("efficientnet_lite0"), workers=0, quiet=True)
    res = ex.extract(paths, FeatureCache(tmp_path / "cache") if cached else None)
    assert res.ok.tolist() == [True, False, True, False, True]
    assert set(res.errors) == {1, 3} and res.computed == 3
    assert not res.features[~res.ok].any() and np.abs(res.features[res.ok]).sum(1).min() > 0


@pytest.mark.slow
def test_same_seed_same_metrics(digits_dir, tmp_path):
    a = train(digits_dir, tmp_path / "a", mode="head", quiet=True, diagnose=False, epochs=5, seed=7, image_size=64)
    b = train(digits_dir, tmp_path / "b", mode="head", quiet=True, diagnose=False, epochs=5, seed=7, image_size=64)
    assert (tmp_path / "a" / "split.csv").read_text() == (tmp_path / "b" / "split.csv").read_text()
    assert a.metrics["test"]["accuracy"] == b.metrics["test"]["accuracy"]
    assert a.metrics["val"]["confusion_matrix"] == b.metrics["val"]["confusion_matrix"]


@pytest.mark.slow
def test_fresh_process_prediction_matches_evaluation(trained_run):
    run = trained_run.run_dir
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    code = ("import json,sys; from transferlab import load_model; m=load_model(sys.argv[1]);"
            "p,_=m.predict_proba(sys.argv[2:]); print(json.dumps(p.tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(run / "model"), *[r["path"] for r in rows]],
                         capture_output=True, text=True, check=True)
    probs = np.array(json.loads(out.stdout))
    labels = json.loads((run / "model" / "config.json").read_text())["classes"]
    expected = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    assert np.abs(probs - expected).max() < 1e-5


@pytest.mark.slow
def test_predict_cli_reports_unreadable_files(trained_run, tmp_path, capsys):
    from transferlab.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    rows = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))
    shutil.copy(rows[0]["path"], folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "readme.txt").write_text("hello")
    assert main(["predict", str(trained_run.model_dir), str(folder), "--json", "--top-k", "2",
                 "--output", str(tmp_path / "p.csv")]) == 0
    res = {r["path"].split("/")[-1]: r for r in json.loads(capsys.readouterr().out)}
    assert res["good.png"]["label"] == rows[0]["predicted_label"] and len(res["good.png"]["predictions"]) == 2
    assert "not an image" in res["bad.jpg"]["error"] and "not an image" in res["readme.txt"]["error"]
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 3


def test_artifact_errors_are_clear(trained_run, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(trained_run.model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["format_version"] = 99
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(model)
    cfg["format_version"] = 1
    cfg["head"]["in_features"] = 7
    cfg.pop("weights_sha256")
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="wrong shape"):
        load_artifact(model)
    (model / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(model)
    with pytest.raises(ArtifactError, match="no model"):
        load_model(tmp_path / "nothing")


@pytest.mark.slow
def test_presplit_layout_is_used_exactly(tmp_path):
    from transferlab.demo import build_digits_dataset

    src = build_digits_dataset(tmp_path / "src", per_class=10)
    root = tmp_path / "data"
    for label_dir in sorted(src.iterdir()):
        files = sorted(label_dir.iterdir())
        for split, chunk in (("train", files[:6]), ("val", files[6:8]), ("test", files[8:])):
            (root / split / label_dir.name).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, root / split / label_dir.name / f.name)
    res = train(root, tmp_path / "run", mode="head", quiet=True, diagnose=False, epochs=3, image_size=64)
    rows = list(csv.DictReader(open(tmp_path / "run" / "split.csv")))
    assert len(rows) == 100
    for r in rows:
        assert f"/{r['split']}/{r['label']}/" in r["path"]
    assert res.metrics["n_images"] == {"train": 60, "val": 20, "test": 20}


@pytest.mark.slow
def test_evaluate_command_writes_outputs(trained_run, digits_dir, tmp_path):
    m = evaluate(trained_run.model_dir, digits_dir, tmp_path / "ev")
    assert m["test"]["n"] == 200
    for name in ("metrics.json", "report.html", "predictions.csv", "confusion_matrix.png"):
        assert (tmp_path / "ev" / name).is_file()


@pytest.mark.slow
def test_mlp_head_and_class_weights(digits_dir, tmp_path, monkeypatch):
    """An MLP head on imbalanced data with --balance weights: its loss weighs each class by its inverse
    frequency (the rare class most), and the artifact is an MLP that predicts."""
    import transferlab.tasks as tasks

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    for png in sorted((data / "0").glob("*.png"))[5:]:  # class 0: 5 images, every other class 20
        png.unlink()
    seen = []
    fit_head = tasks.fit_head
    monkeypatch.setattr(tasks, "fit_head", lambda *a, **k: seen.append(a[5]) or fit_head(*a, **k))
    res = train(data, tmp_path / "mlp", mode="head", quiet=True, epochs=3, head=(64, 32), dropout=0.2,
                balance="weights", diagnose=False, image_size=64)
    assert "learning_curve" not in res.metrics and not (tmp_path / "mlp" / "label_issues.csv").exists()
    weights = seen[0].class_weights
    classes = json.loads((res.model_dir / "config.json").read_text())["classes"]
    rare = classes.index("0")
    assert weights[rare] == max(weights) and weights[rare] > 2 * min(weights) and min(weights) < 1 < max(weights)
    cfg = json.loads((res.model_dir / "config.json").read_text())
    assert cfg["head"]["hidden"] == [64, 32] and cfg["training"]["config"]["balance"] == "weights"
    pred = load_model(res.model_dir).predict([str(next((data / "7").glob("*.png")))])[0]
    assert pred.error is None and pred.label in classes


@pytest.mark.slow
def test_cache_cli_info_and_clear(tmp_path, digits_dir, capsys):
    from transferlab.cli import main

    train(digits_dir, tmp_path / "r", mode="head", quiet=True, diagnose=False, epochs=2, cache_dir=str(tmp_path / "c"),
          image_size=64)
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["namespaces"][0]["entries"] == 200
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c")]) == 0
    assert FeatureCache(tmp_path / "c").info() == []


def test_demo_dataset_is_real_digits(tmp_path):
    from PIL import Image

    from transferlab.demo import build_digits_dataset

    d = build_digits_dataset(tmp_path / "d", per_class=3)
    assert sorted(p.name for p in d.iterdir()) == [str(i) for i in range(10)]
    files = sorted(d.rglob("*.png"))
    assert len(files) == 30
    img = np.asarray(Image.open(files[0]))
    assert img.shape == (64, 64) and img.min() < 100 and img.max() > 200  # dark strokes on light paper


def test_temperature_scaling_never_changes_argmax_and_is_stored(trained_run):
    from transferlab.evaluation.calibration import apply_temperature, expected_calibration_error, fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (300, 5))
    from transferlab.evaluation.metrics import softmax

    true = softmax(logits, 2.5)  # the labels follow the logits at temperature 2.5: the model is over-confident
    y = np.array([rng.choice(5, p=row) for row in true])

    p = softmax(logits)
    t = fit_temperature(p, y)
    q = apply_temperature(p, t)
    assert 1.8 < t < 3.5 and (q.argmax(1) == p.argmax(1)).all()
    assert expected_calibration_error(q, y) < expected_calibration_error(p, y)
    m = json.loads((trained_run.run_dir / "metrics.json").read_text())
    cfg = json.loads((trained_run.model_dir / "config.json").read_text())
    assert cfg["calibration"]["temperature"] == m["calibration"]["temperature"] > 0
    assert {"val_ece_before", "val_ece_after"} <= set(m["calibration"])


def test_options_a_run_will_not_use_are_named():
    from transferlab.pipeline import TrainConfig

    assert TrainConfig().ignored() == [] and TrainConfig(mode="finetune", freeze_epochs=3).ignored() == []
    said = TrainConfig(aug_views=2, augment="none", freeze_epochs=3).ignored()
    assert any("--aug-views 2 with --augment none" in s for s in said) and any("--freeze-epochs 3" in s for s in said)


def test_resume_names_the_options_it_ignores(tmp_path, capsys):
    from transferlab.cli import main

    assert main(["train", "--resume", str(tmp_path / "nope"), "--epochs", "5", "--backbone", "vgg16", "-q"]) == 2
    err = capsys.readouterr().err
    assert "ignored with --resume" in err and "--epochs" in err and "--backbone" in err and "-q" not in err


def test_each_train_default_is_written_once():
    """The CLI's train options, the head's and fine-tuning's configs and the split take their defaults from
    TrainConfig: change one there and every layer follows."""
    import typer

    from transferlab.cli.main import app
    from transferlab.config import TrainConfig
    from transferlab.data.split import split_dataset
    from transferlab.training.finetune import FinetuneConfig
    from transferlab.training.head import HeadConfig

    d = TrainConfig()
    train_cmd = typer.main.get_command(app).commands["train"]
    checked = 0
    # "1024,1024", "1,3,5", "15m", a flag for True/None, "recipe,orient"
    spelled_differently = ("head", "top_k", "time_limit", "allow_download", "candidates")
    for p in train_cmd.params:
        if isinstance(p, typer.core.TyperOption) and hasattr(d, p.name) and p.name not in spelled_differently:
            assert p.default == getattr(d, p.name), p.name
            checked += 1
    assert checked >= 25
    head, ft = HeadConfig(), FinetuneConfig()
    assert (head.epochs, head.lr, head.batch_size, head.patience, head.hidden) == (d.epochs, d.lr, d.batch_size,
                                                                                    d.patience, d.head)
    assert (ft.epochs, ft.lr, ft.batch_size, ft.patience, ft.label_smoothing, ft.frozen_stride) == (
        d.ft_epochs, d.ft_lr, d.ft_batch_size, d.ft_patience, d.ft_label_smoothing, d.frozen_stride)
    assert d.augment == "auto" and ft.augment == "light"  # auto is light until the orientation check says otherwise
    import inspect

    sig = inspect.signature(split_dataset).parameters
    assert (sig["val"].default, sig["test"].default, sig["seed"].default) == (d.val, d.test, d.seed)


def test_config_file_sets_options_and_flags_win(tmp_path, monkeypatch, capsys):
    from transferlab import pipeline
    from transferlab.cli import main

    seen = {}

    def fake_train(data, out, **options):
        seen.update(options)
        raise pipeline.ConfigError("stop here")

    monkeypatch.setattr(pipeline, "train", fake_train)
    toml = tmp_path / "options.toml"
    toml.write_text('mode = "head"\nepochs = 7\nhead = [64, 32]\ntime_limit = "2m"\nseed = 3\n')
    assert main(["train", str(tmp_path), "--config", str(toml), "--seed", "9", "-q"]) == 2
    assert (seen["mode"], seen["epochs"], seen["head"], seen["time_limit"], seen["seed"]) == ("head", 7, (64, 32),
                                                                                             120.0, 9)
    # a run's train_config.json repeats that run's options
    saved = tmp_path / "train_config.json"
    saved.write_text('{"data": "/x", "config": {"mode": "knn", "ft_lr": 0.002, "no_such_old_field": 1}}')
    assert main(["train", str(tmp_path), "--config", str(saved), "-q"]) == 2
    assert (seen["mode"], seen["ft_lr"]) == ("knn", 0.002)
    bad = tmp_path / "bad.json"
    bad.write_text('{"mdoe": "head"}')
    capsys.readouterr()
    assert main(["train", str(tmp_path), "--config", str(bad), "-q"]) == 2
    assert "unknown option(s) 'mdoe'" in capsys.readouterr().err
    yaml = tmp_path / "options.yaml"
    yaml.write_text("mode: head\n")
    assert main(["train", str(tmp_path), "--config", str(yaml), "-q"]) == 2
    said = capsys.readouterr().err
    assert "expected a .toml or .json file" in said and "cannot read it" not in said


#: Every TrainConfig field: a value a --config file sets, the flag that overrides it, and the value it gives.
FLAG_WINS = {
    "backbone": ("efficientnet_lite1", ["--backbone", "efficientnet_lite2"], "efficientnet_lite2"),
    "mode": ("head", ["--mode", "knn"], "knn"),
    "pretrained": (True, ["--no-pretrained"], False),
    "weights": ("a.safetensors", ["--weights", "b.safetensors"], "b.safetensors"),
    "allow_download": (None, ["--allow-download"], True),
    "cut_stage": (2, ["--cut-stage", "3"], 3),
    "image_size": (160, ["--image-size", "96"], 96),
    "head": ([64], ["--head", "32,16"], (32, 16)),
    "dropout": (0.1, ["--dropout", "0.2"], 0.2),
    "epochs": (7, ["--epochs", "9"], 9),
    "lr": (0.01, ["--lr", "0.02"], 0.02),
    "weight_decay": (0.01, ["--weight-decay", "0.02"], 0.02),
    "batch_size": (16, ["--batch-size", "8"], 8),
    "patience": (4, ["--patience", "5"], 5),
    "label_smoothing": (0.05, ["--label-smoothing", "0.2"], 0.2),
    "balance": ("weights", ["--balance", "sampler"], "sampler"),
    "aug_views": (1, ["--aug-views", "2"], 2),
    "ft_epochs": (3, ["--ft-epochs", "4"], 4),
    "ft_lr": (0.002, ["--ft-lr", "0.003"], 0.003),
    "ft_batch_size": (8, ["--ft-batch-size", "4"], 4),
    "ft_patience": (5, ["--ft-patience", "6"], 6),
    "ft_label_smoothing": (0.0, ["--ft-label-smoothing", "0.2"], 0.2),
    "ft_mixup": ("on", ["--mixup", "off"], "off"),
    "ft_drop_path": (0.1, ["--drop-path", "0.2"], 0.2),
    "freeze_epochs": (2, ["--freeze-epochs", "3"], 3),
    "unfreeze": ("2", ["--unfreeze", "3"], "3"),
    "frozen_stride": (8, ["--frozen-stride", "0"], 0),
    "augment": ("strong", ["--augment", "orient"], "orient"),
    "grad_clip": (2.0, ["--grad-clip", "0"], None),
    "time_limit": ("2m", ["--time-limit", "90s"], 90.0),
    "accelerator": ("gpu", ["--accelerator", "cpu"], "cpu"),
    "devices": (2, ["--devices", "3"], 3),
    "strategy": ("ddp", ["--strategy", "fsdp"], "fsdp"),
    "num_nodes": (2, ["--num-nodes", "3"], 3),
    "seed": (3, ["--seed", "9"], 9),
    "val": (0.2, ["--val", "0.25"], 0.25),
    "test": (0.2, ["--test", "0.25"], 0.25),
    "cache_dir": ("a", ["--cache-dir", "b"], "b"),
    "no_cache": (False, ["--no-cache"], True),
    "workers": (1, ["--workers", "0"], 0),
    "device": ("cuda", ["--device", "cpu"], "cpu"),
    "mixed_precision": (True, ["--no-amp"], False),
    "engine": ("torch", ["--engine", "onnxruntime"], "onnxruntime"),
    "quiet": (False, ["-q"], True),
    "top_k": ([1, 2], ["--top-k", "1,4"], (1, 4)),
    "dedupe": (False, ["--dedupe"], True),
    "diagnose": (True, ["--no-diagnose"], False),
    "task": ("single", ["--task", "multilabel"], "multilabel"),
    "recipe": ("race", ["--recipe", "single"], "single"),
    "candidates": (["orient"], ["--candidates", "recipe,bn-adapt"], ("recipe", "bn-adapt")),
}


def _train_sees(argv: list[str], monkeypatch) -> dict:
    """The options ``transferlab train ARGV`` hands to the library (which is stopped there)."""
    from transferlab import pipeline
    from transferlab.cli import main

    seen: dict = {}

    def fake_train(data, out, **options):
        seen.update(options)
        raise pipeline.ConfigError("stop here")

    monkeypatch.setattr(pipeline, "train", fake_train)
    assert main(["train", *argv]) == 2
    return seen


def test_every_option_is_a_flag_and_flags_win_over_a_config_file(tmp_path, monkeypatch):
    """Each TrainConfig field is set by a --config file, and its flag, given too, wins (the flags of
    renamed fields, --mixup and --drop-path, once lost to the file)."""
    import json as json_
    from dataclasses import fields

    from transferlab.config import TrainConfig

    assert set(FLAG_WINS) == {f.name for f in fields(TrainConfig)}
    config = tmp_path / "options.json"
    config.write_text(json_.dumps({name: file_value for name, (file_value, _, _) in FLAG_WINS.items()}))
    from_file = _train_sees([str(tmp_path), "--config", str(config)], monkeypatch)
    expected_file = {n: (tuple(v) if isinstance(v, list) else v) for n, (v, _, _) in FLAG_WINS.items()}
    expected_file["time_limit"] = 120.0
    assert {n: from_file[n] for n in FLAG_WINS} == expected_file
    for name, (_, flag, wins) in FLAG_WINS.items():
        seen = _train_sees([str(tmp_path), "--config", str(config), *flag], monkeypatch)
        assert seen[name] == wins, (name, flag, seen[name])
        others = {n: seen[n] for n in FLAG_WINS if n != name and not (name == "quiet" and n == "quiet")}
        assert others == {n: v for n, v in expected_file.items() if n in others}, name


def test_a_usage_error_is_a_message_not_a_traceback(capsys):
    from transferlab.cli import main

    assert main(["train", "--no-such-flag"]) == 2
    assert "No such option: --no-such-flag" in capsys.readouterr().err
