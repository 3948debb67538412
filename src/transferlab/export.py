"""Export to ONNX (fp32 or int8) and TorchScript, each checked against the PyTorch model right after
it is written. A failed check is an :class:`ExportError`; the check's figures are printed by the CLI
and stored beside the file as ``<file>.check.json``.

int8 is judged as NNCF's and Intel Neural Compressor's accuracy-aware quantization judge it, by accuracy
(:func:`int8_verdict`: within 1 point of fp32's accuracy, and 99% top-1 agreement on the images fp32
decides with a clear margin). The whole backbone is quantized first; while the *validation* images fail
the criterion, the layers at the finest output stride are given back to fp32, then the next stride. The
check that follows is on the *test* images, which the selection never sees. A file that fails its check
is removed, so nothing uses it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._io import file_digest, write_json
from .artifacts import build_classifier, open_artifact
from .data.images import load_image
from .data.transforms import EvalTransform
from .engines import set_onnx_metadata, write_onnx
from .errors import ConfigError, ExportError

__all__ = ["export_model", "int8_verdict", "describe_int8", "ProbabilityModel", "FORMATS"]

FORMATS = ("onnx", "torchscript")
FP32_TOLERANCE = 1e-4
#: int8 criterion (:func:`int8_verdict`): at most this accuracy drop, absolute ...
INT8_MAX_ACCURACY_DROP = 0.01
#: ... and this top-1 agreement on the images fp32 decides by at least this margin.
INT8_MIN_AGREEMENT = 0.99
INT8_CONFIDENT_MARGIN = 0.2


class ProbabilityModel(nn.Module):
    """uint8 NCHW pixels -> calibrated class probabilities (what an exported file computes); with
    ``multilabel``, one independent sigmoid probability per label."""

    def __init__(self, classifier: nn.Module, temperature: float, multilabel: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.temperature = float(temperature)
        self.multilabel = multilabel

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(pixels)
        if self.multilabel:
            return torch.sigmoid(logits)
        return torch.softmax(logits / self.temperature, dim=-1)


def _metadata(cfg: dict[str, Any]) -> dict[str, str]:
    meta = {"transferlab_format": "transferlab-export", "classes": json.dumps(cfg["classes"]),
            "preprocessing": json.dumps(cfg["preprocessing"]), "backbone": json.dumps(cfg["backbone"]),
            "calibration": json.dumps(cfg.get("calibration") or {"temperature": 1.0}),
            "input": "uint8 RGB pixels, NCHW, resized and centre-cropped as 'preprocessing' says",
            "output": "class probabilities in the order of 'classes'"}
    if cfg.get("task") == "multilabel":
        meta.update(task=json.dumps("multilabel"), thresholds=json.dumps(cfg["thresholds"]),
                    output="one sigmoid probability per label in the order of 'classes'; a label is on at or "
                           "above its entry of 'thresholds'")
    return meta


def _split_rows(cfg: dict[str, Any], split: str, limit: int) -> list[tuple[str, str]]:
    path = (cfg.get("training") or {}).get("split_csv")
    if not path or not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["path"], r.get("label", "")) for r in csv.DictReader(f)
                if r.get("split") == split and Path(r["path"]).is_file()]
    return rows[:limit]


def _batch(paths: Sequence[str], transform: EvalTransform) -> tuple[torch.Tensor, list[int]]:
    """The images that decode, and their positions in ``paths``."""
    out, kept = [], []
    for i, p in enumerate(paths):
        try:
            out.append(transform(load_image(p, draft=transform.draft)))
            kept.append(i)
        except Exception:
            continue
    return (torch.stack(out) if out else torch.empty(0)), kept


def _samples(cfg: dict[str, Any], transform: EvalTransform, split: str, n: int,
             seed: int) -> tuple[torch.Tensor, np.ndarray | None, str]:
    """Images of ``split`` of the model's own data with their class indices, or generated images
    (labels ``None``) when the data is not on this machine."""
    rows = _split_rows(cfg, split, n)
    x, kept = _batch([p for p, _ in rows], transform)
    if len(x):
        index = {c: i for i, c in enumerate(cfg.get("classes", []))}
        labels = [index.get(rows[i][1], -1) for i in kept]
        y = np.asarray(labels) if all(v >= 0 for v in labels) else None
        return x, y, f"{len(x)} {split} images of the model"
    size = transform.pre.size
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.int64)
    noise = torch.randint(-40, 41, (n, 3, size, size), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8), None, f"{n} generated images"


def int8_verdict(p_int8: np.ndarray, p_fp32: np.ndarray, y: np.ndarray | None) -> dict[str, Any]:
    """Judge int8 as Intel Neural Compressor and NNCF do, by accuracy: it passes when its accuracy is
    within :data:`INT8_MAX_ACCURACY_DROP` (absolute) of the fp32 model's on the labelled images ``y``, and
    its top-1 agrees with fp32 on at least :data:`INT8_MIN_AGREEMENT` of the images fp32 decides with a
    top-1 minus top-2 margin of at least :data:`INT8_CONFIDENT_MARGIN`. Without labels, agreement alone."""
    top2 = np.sort(p_fp32, axis=1)[:, -2:] if p_fp32.shape[1] > 1 else np.concatenate([0 * p_fp32, p_fp32], 1)
    confident = (top2[:, 1] - top2[:, 0]) >= INT8_CONFIDENT_MARGIN
    same = p_int8.argmax(1) == p_fp32.argmax(1)
    out: dict[str, Any] = {"confident_agreement": float(same[confident].mean()) if confident.any() else 1.0,
                           "confident_n": int(confident.sum())}
    passed = out["confident_agreement"] >= INT8_MIN_AGREEMENT
    if y is not None and len(y) == len(p_fp32):
        out.update(accuracy_fp32=float(np.mean(p_fp32.argmax(1) == y)), accuracy_int8=float(np.mean(p_int8.argmax(1) == y)),
                   accuracy_n=int(len(y)))
        passed = passed and out["accuracy_int8"] >= out["accuracy_fp32"] - INT8_MAX_ACCURACY_DROP
    out["passed"] = bool(passed)
    return out


def export_model(model: str | os.PathLike[str], fmt: str = "onnx", out: str | os.PathLike[str] | None = None,
                 int8: bool = False, n_check: int = 256, n_calibration: int = 100) -> dict[str, Any]:
    """Export an artifact and check the result; returns the check's figures.

    Example:
        >>> export_model("runs/demo/model", "onnx", int8=True)["top1_agreement"]  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}.")
    if int8 and fmt != "onnx":
        raise ConfigError("--int8 applies to the ONNX format only.")
    artifact = open_artifact(model)
    classifier, cfg = build_classifier(artifact), artifact.config
    multilabel = cfg.get("task") == "multilabel"
    if int8 and multilabel:
        raise ConfigError("--int8 is checked by top-1 accuracy, which a multi-label model does not have; export "
                          "it in fp32 (without --int8).")
    temperature = float((cfg.get("calibration") or {}).get("temperature", 1.0))
    net = ProbabilityModel(classifier.float().eval(), temperature, multilabel).eval()
    transform = EvalTransform(classifier.preprocessing)
    suffix = {"onnx": ".int8.onnx" if int8 else ".onnx", "torchscript": ".torchscript.pt"}[fmt]
    out_path = Path(out) if out else artifact.file(f"model{suffix}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    x_check, y_check, check_source = _samples(cfg, transform, "test", n_check, seed=1)
    with torch.inference_mode():
        reference = net(x_check).numpy()
    meta = _metadata(cfg)
    if fmt == "torchscript":
        got = _export_torchscript(net, x_check, out_path, meta)
    else:
        _export_onnx(net, x_check[:2], out_path, meta)
        if int8:
            x_cal, _, cal_source = _samples(cfg, transform, "train", n_calibration, seed=2)
            x_val, y_val, val_source = _samples(cfg, transform, "val", n_check, seed=3)
            mixed = _quantize(out_path, x_cal, x_val, y_val, meta)
            mixed.update(calibrated_on=cal_source, selected_on=val_source)
            fp32 = (f"the layers at output stride <= {mixed['fp32_up_to_stride']} stay fp32"
                    if mixed["fp32_up_to_stride"] else "no backbone layer stays fp32")
            mixed["precision"] = (f"int8 on {mixed['int8_nodes']} of {mixed['backbone_nodes']} backbone nodes; {fp32} "
                                  f"(on {val_source}: {describe_int8(mixed['val'])})")
        got = _run_onnx(out_path, x_check)
    diff = float(np.abs(got - reference).max())
    if multilabel:  # every label's decision at its threshold
        cut = np.asarray(cfg["thresholds"])
        agreement = float(np.mean(((got >= cut) == (reference >= cut)).all(1)))
    else:
        agreement = float(np.mean(got.argmax(1) == reference.argmax(1)))
    check = {"format": fmt, "int8": int8, "file": str(out_path), "bytes": out_path.stat().st_size,
             "sha256": file_digest(out_path), "checked_on": check_source, "weights_sha256": cfg.get("weights_sha256"),
             "max_abs_diff": diff, "top1_agreement": agreement,
             "agreement_of": "the label decisions at their thresholds" if multilabel else "the top-1 class",
             "criterion": (f"accuracy within {100 * INT8_MAX_ACCURACY_DROP:g} point of fp32 and top-1 agreement >= "
                           f"{INT8_MIN_AGREEMENT} where fp32's top-1 minus top-2 >= {INT8_CONFIDENT_MARGIN}" if int8
                           else f"max |p - p_torch| <= {FP32_TOLERANCE}")}
    if int8:
        check.update(mixed)
        check["test"] = int8_verdict(got, reference, y_check)
        check["passed"] = check["test"]["passed"]
    else:
        check["passed"] = diff <= FP32_TOLERANCE
    write_json(str(out_path) + ".check.json", check)
    if not check["passed"]:
        out_path.unlink(missing_ok=True)  # a file that failed its check is never left where it would be used
        figures = describe_int8(check["test"]) if int8 else f"max diff {diff:.2e}, top-1 agreement {agreement:.3f}"
        raise ExportError(f"exported {fmt}{' int8' if int8 else ''} model failed its check: {check['criterion']}; "
                          f"got {figures} on {check_source}{'; ' + check['precision'] if int8 else ''}; the file was "
                          f"removed ({out_path}.check.json has the figures)")
    return check


def describe_int8(v: dict[str, Any]) -> str:
    """One line for an :func:`int8_verdict`."""
    acc = (f"accuracy {v['accuracy_int8']:.4f} against fp32's {v['accuracy_fp32']:.4f} on {v['accuracy_n']} images, "
           if "accuracy_n" in v else "no labels, ")
    return f"{acc}top-1 agreement {100 * v['confident_agreement']:.1f}% on {v['confident_n']} confident images"


def _export_torchscript(net: nn.Module, x: torch.Tensor, out: Path, meta: dict[str, str]) -> np.ndarray:
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, x[:2], check_trace=False)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.jit.save(traced, str(tmp), _extra_files={"transferlab.json": json.dumps(meta)})
    os.replace(tmp, out)
    loaded = torch.jit.load(str(out))
    with torch.inference_mode():
        return loaded(x).numpy()


def _export_onnx(net: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    write_onnx(net, example, tmp, "probabilities", meta)
    os.replace(tmp, out)


def _finish_onnx(tmp: Path, out: Path, meta: dict[str, str]) -> None:
    """Set the file's metadata to ``meta`` (replacing any), then move it into place atomically."""
    set_onnx_metadata(tmp, meta)
    os.replace(tmp, out)


def _output_strides(model) -> dict[str, int]:
    """Each node's output stride (input height / output height) from the shapes that shape inference
    stored; nodes without a 4-D output get a stride larger than any."""
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    height = dims[model.graph.input[0].name][2]
    out = {}
    for node in model.graph.node:
        d = dims.get(node.output[0]) if node.output else None
        out[node.name] = height // d[2] if d and len(d) == 4 and d[2] else 1 << 30
    return out


def _quantize(path: Path, x_cal: torch.Tensor, x_val: torch.Tensor, y_val: np.ndarray | None,
              meta: dict[str, str]) -> dict[str, Any]:
    """Quantize the backbone of the ONNX file at ``path`` in place, giving the finest-stride layers back
    to fp32 until the int8 criterion (:func:`int8_verdict`) holds on ``x_val`` (see the module's doc);
    returns what was chosen and every attempt's figures."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:  # one image per call: the percentile calibrator needs equal shapes
            self.items = iter([{"pixels": x_cal[i:i + 1].numpy()} for i in range(len(x_cal))])

        def get_next(self):
            return next(self.items, None)

    reference = _run_onnx(path, x_val)
    with tempfile.TemporaryDirectory() as d:
        pre = Path(d) / "pre.onnx"
        try:
            quant_pre_process(str(path), str(pre))
        except Exception:
            pre = path
        model = onnx.load(str(pre))
        stride = _output_strides(model)
        # The backbone's convolutions and activations in int8; the input normalisation, pooling, head and
        # softmax stay fp32 (they cost little and carry the fine differences between classes).
        # Percentile calibration measured best on the demo model (BENCHMARKS.md); the check decides.
        keep_fp32 = ("GlobalAveragePool", "Flatten", "ReduceMean")
        backbone = [n.name for n in model.graph.node
                    if n.name.startswith("/classifier/backbone/") and n.op_type not in keep_fp32]
        levels = sorted({stride[n] for n in backbone if stride[n] < 1 << 30})
        cache = Path(d) / "calibration.json"  # activation ranges: computed once, reused by every attempt
        attempts: list[dict[str, Any]] = []
        files: list[Path] = []
        for k, fp32_up_to in enumerate([0] + levels[:-1]):
            names = [n for n in backbone if stride[n] > fp32_up_to]
            out = Path(d) / f"attempt{k}.onnx"
            files.append(out)
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
                quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.Percentile, nodes_to_quantize=names,
                                calibration_cache_path=str(cache))
            p = _run_onnx(out, x_val)
            attempts.append({"fp32_up_to_stride": fp32_up_to, "int8_nodes": len(names),
                             "val_agreement": float(np.mean(p.argmax(1) == reference.argmax(1))),
                             "val": int8_verdict(p, reference, y_val)})
            if attempts[-1]["val"]["passed"]:
                break

        def merit(i: int) -> tuple:  # passed first, then accuracy, then agreement; fewest fp32 layers among equals
            v = attempts[i]["val"]
            return v["passed"], v.get("accuracy_int8", 0.0), v["confident_agreement"], -i

        best = max(range(len(attempts)), key=merit)
        tmp = path.with_suffix(path.suffix + ".tmp")
        shutil.move(str(files[best]), tmp)
    _finish_onnx(tmp, path, meta)
    return {**attempts[best], "backbone_nodes": len(backbone), "selection": attempts}


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"pixels": x[i:i + 16].numpy()})[0] for i in range(0, len(x), 16)])
