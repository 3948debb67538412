"""Engines for frozen forward passes: PyTorch and ONNX Runtime agree, the ONNX graph is never stale, ``auto``
measures once and says why, and ``--engine`` works for train, predict and serve."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from transferlab import engines
from transferlab.backbones import create_backbone
from transferlab.cli import main
from transferlab.errors import ConfigError, ExportError
from transferlab.features import FeatureExtractor
from transferlab.predict import load_model


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def _float_in(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` taking uint8 pixels, as the engines' networks do."""
    class AsFloat(torch.nn.Module):
        def forward(self, x):
            return x.float() / 255

    return torch.nn.Sequential(AsFloat(), net).eval()


def test_both_engines_give_the_same_features_on_real_pictures(photos_dir):
    """Pretrained EfficientNet-Lite0 features of real photographs: fp32 PyTorch and ONNX Runtime within 1e-4
    relative (max difference over the largest feature)."""
    paths = sorted(str(p) for p in photos_dir.rglob("*.jpg"))[::3]
    feats = {}
    for name in ("torch", "onnxruntime"):
        ex = FeatureExtractor(*create_backbone("efficientnet_lite0", image_size=128), workers=0, quiet=True,
                              mixed_precision=False, engine=name)
        feats[name] = ex.extract(paths).features
        assert ex.engine.name == name and ex.choice.engine == name
    scale = np.abs(feats["torch"]).max()
    assert scale > 1 and np.abs(feats["torch"]).mean() > 0.05  # real, non-trivial features
    assert np.abs(feats["onnxruntime"] - feats["torch"]).max() / scale <= 1e-4


def test_a_stale_or_damaged_onnx_graph_is_rebuilt_never_used():
    net, other = _float_in(_tiny_net(0)), _float_in(_tiny_net(1))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    first = engines.onnx_engine(net, "tiny", 32)
    assert first.digest == engines.weights_digest(net)
    # a graph made from other weights put in its place (a copied cache, a bug): its digest does not match
    shutil.copy(engines.onnx_engine(other, "tiny", 32).path, first.path)
    again = engines.onnx_engine(net, "tiny", 32)
    assert again.path == first.path and again.digest == engines.weights_digest(net)
    with torch.inference_mode():
        want = net(x)
    assert torch.allclose(again(x), want, rtol=1e-4, atol=1e-5)
    # a truncated file
    first.path.write_bytes(first.path.read_bytes()[:100])
    assert torch.allclose(engines.onnx_engine(net, "tiny", 32)(x), want, rtol=1e-4, atol=1e-5)


def test_auto_measures_once_per_cpu_and_says_why(monkeypatch):
    net = _float_in(_tiny_net(2))
    engine, choice = engines.open_engine(net, "tiny-auto", 32)
    assert set(choice.rates) == {"torch", "onnxruntime"} and all(r > 0 for r in choice.rates.values())
    assert engine.name == choice.engine == max(choice.rates, key=choice.rates.get)
    assert "img/s" in choice.reason and choice.cpu == engines.cpu_model()
    saved = json.loads((engines.engines_dir() / "choices.json").read_text())
    slot = next(k for k in saved if k.startswith("tiny-auto|32px|"))
    assert saved[slot]["engine"] == choice.engine

    def measured_again(*_):
        raise AssertionError("the choice was measured again")

    monkeypatch.setattr(engines, "_rate", measured_again)
    engine2, choice2 = engines.open_engine(net, "tiny-auto", 32)
    assert engine2.name == choice.engine and "measured earlier" in choice2.reason
    # another size is another measurement
    with pytest.raises(AssertionError, match="measured again"):
        engines.open_engine(net, "tiny-auto", 48)


def test_auto_falls_back_to_torch_when_the_network_cannot_be_exported(monkeypatch):
    def refuse(*_):
        raise ExportError("cannot export the network to ONNX: unsupported operator")

    monkeypatch.setattr(engines, "_export", refuse)
    engine, choice = engines.open_engine(_float_in(_tiny_net(3)), "tiny-refused", 32)
    assert engine.name == "torch" and "ONNX Runtime unusable" in choice.reason and "unsupported" in choice.reason
    with pytest.raises(ExportError):
        engines.open_engine(_float_in(_tiny_net(3)), "tiny-refused", 32, engine="onnxruntime")


def test_engine_names_are_checked():
    assert engines.engine_name("onnx") == "onnxruntime" and engines.engine_name(None) == "auto"
    with pytest.raises(ConfigError, match="expected one of auto, torch, onnxruntime"):
        engines.engine_name("tensorrt")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        engines.open_engine(_tiny_net(0), "x", 32, engine="onnxruntime", device=torch.device("cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_train_head_mode_runs_on_either_engine_and_records_it(photos_dir, tmp_path, engine, capsys):
    run = tmp_path / "run"
    assert main(["train", str(photos_dir), "--out", str(run), "--mode", "head", "--image-size", "96",
                 "--no-diagnose", "--engine", engine, "--json"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["timing"]["engine"]["engine"] == engine
    split = metrics["timing"]["extract_split"]  # where the extraction's time went
    assert split["forward_s"] > 0 and 0 <= split["waiting_for_decoding_s"] <= metrics["timing"]["extract_s"]
    assert metrics["test"]["accuracy"] >= 0.75  # cats against coffee


@pytest.mark.slow
def test_predict_and_serve_run_on_either_engine(trained_run, digits_dir, capsys):
    import httpx

    from .conftest import served

    images = sorted(str(p) for p in digits_dir.rglob("*.png"))[::40]
    got = {}
    for engine in ("torch", "onnxruntime"):
        assert main(["predict", str(trained_run.model_dir), *images, "--engine", engine, "--open-set", "--json"]) == 0
        got[engine] = json.loads(capsys.readouterr().out)
        assert all(r["label"] and "ood_score" in r for r in got[engine])  # open set needs features: both give them
    # against PyTorch in fp32 (its bf16 path, where the CPU has one, differs by more than rounding)
    fp32, _ = load_model(trained_run.model_dir, engine="torch", mixed_precision=False).predict_proba(images)
    ort_top = np.array([[p["probability"] for p in r["predictions"]] for r in got["onnxruntime"]])  # descending
    assert np.abs(np.sort(fp32, axis=1)[:, ::-1][:, :ort_top.shape[1]] - ort_top).max() < 1e-3
    with served("serve", str(trained_run.model_dir), "--engine", "onnxruntime") as (_, url):
        health = httpx.get(url + "/health", timeout=10).json()
        r = httpx.post(url + "/predict", files={"file": ("a.png", open(images[0], "rb").read())}, timeout=60)
    assert health["engine"] == "onnxruntime" and r.status_code == 200
    assert r.json()["label"] == got["torch"][0]["label"]
    assert load_model(trained_run.model_dir, engine="torch").engine == "torch"


@pytest.mark.slow
def test_evaluate_runs_on_onnx_runtime(trained_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(trained_run.model_dir), str(digits_dir), "--out", str(out), "--engine",
                 "onnxruntime", "--json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.8 and (out / "report.html").is_file()
