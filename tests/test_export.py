"""Export: ONNX fp32 / int8 and TorchScript files that carry their metadata and pass their checks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from transferlab.errors import ExportError
from transferlab.export import export_model
from transferlab.predict import load_model


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    return {
        "onnx": export_model(trained_run.model_dir, "onnx", d / "m.onnx"),
        "ts": export_model(trained_run.model_dir, "torchscript", d / "m.pt"),
    }


@pytest.mark.slow
def test_exports_pass_their_checks(exported):
    assert exported["onnx"]["passed"] and exported["onnx"]["max_abs_diff"] <= 1e-4
    assert exported["ts"]["passed"] and exported["ts"]["max_abs_diff"] <= 1e-4
    assert "test images of the model" in exported["onnx"]["checked_on"]
    for check in exported.values():
        stored = json.loads(open(check["file"] + ".check.json").read())
        assert stored["max_abs_diff"] == check["max_abs_diff"]


@pytest.mark.slow
def test_predict_accepts_onnx_file(exported, trained_run):
    rows = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[:8]
    paths = [r["path"] for r in rows]
    onnx = load_model(exported["onnx"]["file"])
    torch_model = load_model(trained_run.model_dir)
    assert onnx.classes == torch_model.classes
    p_onnx, _ = onnx.predict_proba(paths)
    p_torch, _ = torch_model.predict_proba(paths)
    assert (p_onnx.argmax(1) == p_torch.argmax(1)).mean() >= 0.875  # bf16 torch path vs fp32 ONNX
    assert np.abs(p_onnx.sum(1) - 1).max() < 1e-5


def test_torchscript_carries_metadata(exported):
    import torch

    extra = {"transferlab.json": ""}
    torch.jit.load(exported["ts"]["file"], _extra_files=extra)
    meta = json.loads(extra["transferlab.json"])
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]


@pytest.mark.slow
def test_int8_check_decides(trained_run, tmp_path):
    path = tmp_path / "m.int8.onnx"
    try:
        check = export_model(trained_run.model_dir, "onnx", path, int8=True, n_calibration=32)
        raised = False
    except ExportError:
        raised = True
    check = json.loads(open(str(path) + ".check.json").read())
    assert "train images" in check["calibrated_on"] and 0 <= check["top1_agreement"] <= 1
    # judged by accuracy (within a point of fp32) and agreement where fp32 is confident
    v = check["test"]
    assert "test images" in check["checked_on"] and v["accuracy_n"] == int(check["checked_on"].split()[0])
    assert 0 < v["confident_n"] <= v["accuracy_n"]
    assert check["passed"] == (v["confident_agreement"] >= 0.99 and v["accuracy_int8"] >= v["accuracy_fp32"] - 0.01) \
        == (not raised)
    assert path.exists() == check["passed"]  # a file that failed is removed
    # the fp32 region is chosen on validation images, starting from the whole backbone in int8, and
    # grows only while the validation agreement is below target
    tried = check["selection"]
    assert "val images" in check["selected_on"]
    assert tried[0]["fp32_up_to_stride"] == 0 and tried[0]["int8_nodes"] == check["backbone_nodes"]
    assert [t["fp32_up_to_stride"] for t in tried] == sorted({t["fp32_up_to_stride"] for t in tried})
    assert all(not t["val"]["passed"] for t in tried[:-1])
    chosen = [t for t in tried if t["fp32_up_to_stride"] == check["fp32_up_to_stride"]]
    assert chosen[0]["int8_nodes"] == check["int8_nodes"]


@pytest.mark.slow
def test_failed_check_is_an_error(trained_run, tmp_path, monkeypatch):
    import transferlab.export as ex

    monkeypatch.setattr(ex, "FP32_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="failed its check"):
        export_model(trained_run.model_dir, "onnx", tmp_path / "bad.onnx")


@pytest.mark.slow
def test_an_exported_onnx_file_runs_on_onnx_runtime_only(exported):
    from transferlab.errors import ConfigError

    assert load_model(exported["onnx"]["file"]).engine == "onnxruntime"
    with pytest.raises(ConfigError, match="runs on ONNX Runtime"):
        load_model(exported["onnx"]["file"], engine="torch")


@pytest.mark.slow
def test_int8_export_passes_on_photographs(photos_dir, tmp_path):
    from transferlab.pipeline import train

    run = train(photos_dir, tmp_path / "run", mode="head", quiet=True, diagnose=False)
    check = export_model(run.model_dir, "onnx", int8=True)
    assert check["passed"] and check["top1_agreement"] >= 0.99
    assert check["fp32_up_to_stride"] == 0 and check["int8_nodes"] == check["backbone_nodes"]  # all int8
    assert check["max_abs_diff"] < 0.05  # int8 probabilities stay close, not only the argmax
