"""Predictor: a saved artifact -> class probabilities for files, folders, PIL images or arrays."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ._io import write_text
from .artifacts import build_classifier, load_artifact, load_openset, open_artifact
from .backbones.models import Classifier
from .data.images import is_image_path, to_rgb
from .data.loader import ImageFiles, collate_images, worker_init
from .data.transforms import EvalTransform, Preprocessing
from .errors import ConfigError
from .engines import Engine, EngineChoice, engine_name, network_key, open_engine
from .probability import sigmoid, softmax
from .runtime import pick_device, prepare_model

__all__ = ["Predictor", "OnnxPredictor", "Prediction", "load_model", "expand_paths",
           "decide_row", "write_predictions", "explain"]

ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One input's result: top-k ``(label, index, probability)`` or an ``error``. A multi-label model's
    ``labels`` are every label at or above its threshold (``label`` joins them with ``;``)."""

    source: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    ood_score: float | None = None
    labels: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Prediction":
        """The prediction :meth:`to_dict` wrote."""
        return cls(d["path"], d.get("label"), d.get("probability"), list(d.get("predictions") or []), d.get("error"),
                   d.get("ood_score"), d.get("labels"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"path", "label", "probability", "predictions": [...], "error"}``, plus
        ``ood_score`` when the open-set check ran and ``labels`` for a multi-label model."""
        out = {"path": self.source, "label": self.label, "probability": self.probability,
               "predictions": self.top_k, "error": self.error}
        if self.ood_score is not None:
            out["ood_score"] = self.ood_score
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def decide_row(p: np.ndarray, classes: Sequence[str], top_k: int, threshold: float | None = None,
               thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """One image's decision from its probabilities: ``label``, ``probability`` and the top-k
    ``predictions``. Single-label: the top class, ``unknown`` below ``threshold``. Multi-label (per-label
    ``thresholds`` given): ``labels`` = every label reaching its threshold (``threshold`` overrides them
    all), ``label`` = those joined by ``;`` (empty: none) and ``probability`` = the top one's."""
    cut = None if thresholds is None else np.full(len(classes), threshold) if threshold is not None else thresholds
    on = [] if cut is None else [j for j in range(len(classes)) if p[j] >= cut[j]]  # class order, as in a manifest
    order = np.argsort(-p)[:max(1, min(max(top_k, len(on)), len(classes)))]  # every label that is on is listed
    top = [{"label": classes[j], "index": int(j), "probability": float(p[j]),
            **({} if cut is None else {"threshold": float(cut[j]), "on": bool(p[j] >= cut[j])})} for j in order]
    out: dict[str, Any] = {"label": top[0]["label"], "probability": top[0]["probability"], "predictions": top}
    if cut is not None:
        out["labels"] = [classes[j] for j in on]
        out["label"] = ";".join(out["labels"])
    elif threshold is not None and top[0]["probability"] < threshold:
        out["label"] = "unknown"
    return out


def expand_paths(inputs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given; folders walked recursively (sorted). Non-image files inside folders are kept so
    that they are reported, not silently ignored; hidden files are left out."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        else:
            out.append(str(p))
    return out


class Predictor:
    """Runs a :class:`Classifier` the same way evaluation does: the backbone on the engine
    :func:`~transferlab.engines.open_engine` chooses (``engine``: ``auto``, ``torch`` or ``onnxruntime``),
    the head in fp32 PyTorch, softmax with the stored temperature.

    Example:
        >>> model = load_model("runs/demo/model")  # doctest: +SKIP
        >>> model.predict(["cat.jpg"], top_k=3)[0].label  # doctest: +SKIP
    """

    openset = None  # the artifact's open-set scorer (load_model sets it)

    def __init__(self, model: Classifier, config: dict[str, Any], device: str | None = None,
                 mixed_precision: bool = True, batch_size: int = 32, workers: int = 0, keep_memory: bool = True,
                 engine: str = "auto") -> None:
        self.config = config
        self.classes: list[str] = list(config["classes"])
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])
        self.temperature = float((config.get("calibration") or {}).get("temperature", 1.0))
        self._set_task(config)
        self.device = pick_device(device)
        self.mixed_precision = mixed_precision
        self.batch_size, self.workers = batch_size, workers
        self.model = prepare_model(model.eval(), self.device, keep_memory=keep_memory)
        self.transform = EvalTransform(self.preprocessing)
        self.engine_request = engine_name(engine)
        self._engine: Engine | None = None
        self._choice: EngineChoice | None = None

    @property
    def backbone_engine(self) -> Engine:
        """The engine that runs the frozen backbone (chosen on first use); the head runs in PyTorch."""
        if self._engine is None:
            bb = self.config.get("backbone") or {}
            key = network_key(str(bb.get("timm_name") or bb.get("name") or "backbone"), bb.get("cut_stage"))
            self._engine, self._choice = open_engine(torch.nn.Sequential(self.model.normalize, self.model.backbone),
                                                    key, self.preprocessing.size, engine=self.engine_request,
                                                    device=self.device, mixed_precision=self.mixed_precision)
        return self._engine

    @property
    def engine(self) -> str:
        """``torch`` or ``onnxruntime``: what runs the backbone."""
        return self.backbone_engine.name

    def use_engine(self, name: str, reason: str) -> None:
        """Run the backbone on ``name`` from now on (a distributed run takes rank 0's engine)."""
        self.engine_request, self._engine = engine_name(name), None
        self.choice.reason = reason

    @property
    def choice(self) -> EngineChoice:
        """Which engine runs the backbone and why."""
        self.backbone_engine
        assert self._choice is not None
        return self._choice

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features (float32) of a uint8 NCHW batch."""
        feats = self.backbone_engine(batch).float().to(self.device)
        return self.model.head(feats).float().cpu().numpy(), feats.cpu().numpy()

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Logits (float32) of a uint8 NCHW batch."""
        return self._forward(batch)[0]

    def _set_task(self, config: dict[str, Any]) -> None:
        """``multilabel`` and the per-label ``thresholds`` (None for a single-label model)."""
        self.multilabel = config.get("task") == "multilabel"
        self.thresholds = np.asarray(config.get("thresholds") or [0.5] * len(self.classes), np.float64) \
            if self.multilabel else None

    def _activate(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        """Probabilities from logits: independent sigmoids for a multi-label model, else softmax."""
        return sigmoid(logits) if self.multilabel else softmax(logits, temperature)

    def _batch(self, batch: torch.Tensor, temperature: float, tta: bool,
               scores: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities of a batch and, with ``scores``, its open-set scores (of the image, not the mirror)."""
        logits, feats = self._forward(batch)
        p = self._activate(logits, temperature)
        if tta:  # average with the mirror image
            p = (p + self._activate(self.logits(batch.flip(-1)), temperature)) / 2
        return p, (self.openset.score(feats) if scores and self.openset is not None else None)

    def predict_proba(self, inputs: Sequence[ImageInput], calibrated: bool = True,
                      tta: bool = False) -> tuple[np.ndarray, list[str | None]]:
        """Probabilities ``(n, classes)`` and one error message (or None) per input; failed rows are NaN.

        ``calibrated`` applies the stored temperature (default True); ``tta`` averages the image and its
        mirror (default False)."""
        probs, errors, _ = self.predict_scores(inputs, calibrated, tta, open_set=False)
        return probs, errors

    def predict_scores(self, inputs: Sequence[ImageInput], calibrated: bool = True, tta: bool = False,
                       open_set: bool = True) -> tuple[np.ndarray, list[str | None], np.ndarray | None]:
        """:meth:`predict_proba` plus the open-set score of each input (``None`` when the model has no
        open-set scorer, the model is an exported ONNX file, or ``open_set`` is False)."""
        want = open_set and self.openset is not None
        scores = np.full(len(inputs), np.nan) if want else None
        probs = np.full((len(inputs), len(self.classes)), np.nan)
        errors: list[str | None] = [None] * len(inputs)
        temperature = self.temperature if calibrated else 1.0
        path_idx = [i for i, x in enumerate(inputs) if isinstance(x, (str, os.PathLike))]
        path_set = set(path_idx)
        mem_idx = [i for i in range(len(inputs)) if i not in path_set]
        for i in path_idx:
            if not is_image_path(inputs[i]) and os.path.isfile(inputs[i]):
                errors[i] = f"not an image file (extension '{Path(inputs[i]).suffix}')"
        todo = [i for i in path_idx if errors[i] is None]
        if todo:
            files = ImageFiles([str(inputs[i]) for i in todo], self.transform)
            if self.workers and len(todo) > self.batch_size:
                batches: Iterable = DataLoader(files, batch_size=self.batch_size, num_workers=self.workers,
                                               collate_fn=collate_images, worker_init_fn=worker_init)
            else:  # in-process: no loader start-up cost on the single-image path
                batches = (collate_images([files[j] for j in range(s, min(s + self.batch_size, len(files)))])
                           for s in range(0, len(files), self.batch_size))
            for x, idx, _, bad in batches:
                for j, reason in bad:
                    errors[todo[j]] = reason
                if len(idx):
                    rows = [todo[j] for j in idx.tolist()]
                    probs[rows], sc = self._batch(x, temperature, tta, want)
                    if sc is not None:
                        scores[rows] = sc
        if mem_idx:
            tensors = []
            for i in mem_idx:
                img = inputs[i]
                if isinstance(img, torch.Tensor):  # already through self.transform (the service does that)
                    tensors.append(img)
                    continue
                if isinstance(img, np.ndarray):
                    img = Image.fromarray(img)
                tensors.append(self.transform(to_rgb(img)))
            for s in range(0, len(tensors), self.batch_size):
                rows = mem_idx[s:s + self.batch_size]
                probs[rows], sc = self._batch(torch.stack(tensors[s:s + self.batch_size]), temperature, tta, want)
                if sc is not None:
                    scores[rows] = sc
        return probs, errors, scores

    def predict(self, inputs: Sequence[ImageInput], top_k: int = 5, threshold: float | None = None,
                calibrated: bool = True, tta: bool = False, open_set: bool = False) -> list[Prediction]:
        """Top-k predictions per input; with ``threshold``, a top probability below it is labelled
        ``unknown`` (the top-k list is kept). With ``open_set``, an image whose features lie beyond the
        model's open-set threshold is ``unknown`` too, and each prediction carries its ``ood_score``.
        A multi-label model returns every label at or above its tuned threshold (``threshold`` replaces
        them all) in ``labels``.

        Raises:
            ConfigError: ``open_set`` on a model without an open-set scorer (an exported ONNX file has none)."""
        if open_set and self.openset is None:
            raise ConfigError("--open-set: this model has no open-set scorer (train it again; it needs a validation "
                              "split and a backbone that was not fine-tuned; an exported ONNX file has none).")
        probs, errors, scores = self.predict_scores(inputs, calibrated, tta, open_set)
        out = []
        for i, x in enumerate(inputs):
            src = str(x) if isinstance(x, (str, os.PathLike)) else f"<image {i}>"
            if errors[i] is not None:
                out.append(Prediction(src, error=errors[i]))
                continue
            d = decide_row(probs[i], self.classes, top_k, threshold, self.thresholds)
            ood = float(scores[i]) if scores is not None else None
            if ood is not None and ood > self.openset.threshold:
                d["label"] = "unknown"
            out.append(Prediction(src, d["label"], d["probability"], d["predictions"], ood_score=ood,
                                  labels=d.get("labels")))
        return out


def load_model(path: str | os.PathLike[str], device: str | None = None, mixed_precision: bool = True,
               engine: str = "auto", keep_memory: bool = True) -> Predictor:
    """Load an artifact directory (or an ONNX file exported by transferlab) as a :class:`Predictor`.

    ``engine`` runs the artifact's backbone: ``torch``, ``onnxruntime`` (an fp32 graph built from the
    artifact's weights and cached), or ``auto`` (default): the faster of the two on this CPU, measured once.
    An exported ``.onnx`` file always runs on ONNX Runtime. ``keep_memory=False`` leaves the C allocator as
    it is (a long-lived service; see :func:`~transferlab.runtime.keep_freed_memory`).

    Raises:
        ArtifactError: missing files, unknown format version, tensors that do not fit.
        ConfigError: an unknown engine, or ``torch`` for an exported ONNX file.
    """
    name = engine_name(engine)
    if str(path).lower().endswith(".onnx"):
        if name == "torch":
            raise ConfigError(f"'{path}' is an ONNX file: it runs on ONNX Runtime (use the model directory for "
                              "--engine torch).")
        return OnnxPredictor(path)
    artifact = open_artifact(path)
    predictor = Predictor(build_classifier(artifact), artifact.config, device=device, mixed_precision=mixed_precision,
                          keep_memory=keep_memory, engine=name)
    predictor.openset = load_openset(artifact)
    return predictor


class OnnxPredictor(Predictor):
    """A :class:`Predictor` over an exported ONNX file, run by ONNX Runtime on the CPU. The file
    carries its classes, preprocessing and temperature as metadata, so it is usable alone."""

    engine = "onnxruntime"
    choice = EngineChoice("onnxruntime", "an exported ONNX file")

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 32, workers: int = 0) -> None:
        import json

        import onnxruntime as ort

        from .errors import ArtifactError

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ArtifactError(f"cannot load ONNX model '{path}': {exc}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("transferlab_format") != "transferlab-export":
            raise ArtifactError(f"'{path}' is not an ONNX file exported by transferlab (no metadata).")
        self.config = {k: json.loads(v) for k, v in meta.items() if k in ("classes", "preprocessing", "backbone",
                                                                         "calibration", "task", "thresholds")}
        self.classes = list(self.config["classes"])
        self._set_task(self.config)
        self.preprocessing = Preprocessing.from_dict(self.config["preprocessing"])
        self.baked_temperature = float(self.config.get("calibration", {}).get("temperature", 1.0))
        self.temperature = self.baked_temperature
        self.batch_size, self.workers = batch_size, workers
        self.transform = EvalTransform(self.preprocessing)
        self.model = None

    def _batch(self, batch: torch.Tensor, temperature: float, tta: bool,
               scores: bool = False) -> tuple[np.ndarray, None]:
        """Probabilities of a batch; the exported graph has no feature output, so no open-set scores."""
        def run(x: torch.Tensor) -> np.ndarray:
            p = self.session.run(None, {"pixels": x.contiguous().numpy()})[0].astype(np.float64)
            if temperature != self.baked_temperature and not self.multilabel:
                p = softmax(np.log(np.clip(p, 1e-300, None)) * self.baked_temperature, temperature)
            return p

        p = run(batch)
        return ((p + run(batch.flip(-1))) / 2 if tta else p), None


def write_predictions(results: Sequence[Prediction], path: str | os.PathLike[str]) -> None:
    """Write predictions as ``.json`` (a list of objects) or ``.csv`` (path, label, probability, top-k, error)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--output {str(path)!r}: expected a .csv or .json file name.")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "probability", "top_k", "error"])
    for r in results:
        top = ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.top_k)
        w.writerow([r.source, r.label or "", "" if r.probability is None else f"{r.probability:.6f}", top, r.error or ""])
    write_text(path, buf.getvalue())


def explain(model: str | os.PathLike[str], image: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the Grad-CAM overlay of where a saved model looked for its prediction on ``image`` to ``out``
    (PNG); returns the label and probability."""
    from .evaluation.interpret import explain_image

    net, cfg = load_artifact(model)
    heat, k, probs = explain_image(net, str(image))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(heat).save(out)
    return {"image": str(image), "label": cfg["classes"][k], "probability": float(probs[k]), "heatmap": str(out)}
