"""The main job, end to end: scan, split, extract/cache features, train, evaluate, save.

``train`` and ``evaluate`` are what the CLI commands of the same names call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .artifacts import save_artifact
from .backbones.models import Classifier, build_head, create_backbone
from .data.scan import Dataset, Skipped, scan
from .data.split import split_dataset, write_skipped_csv, write_split_csv
from .errors import ConfigError, DataError
from .evaluation.metrics import softmax
from .evaluation.outputs import SplitResult, write_run_outputs
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor
from .predict import load_model
from .training.callbacks import History
from .training.head import HeadConfig, balanced_class_weights, fit_head

__all__ = ["TrainConfig", "RunResult", "train", "evaluate", "default_run_dir"]

log = logging.getLogger("transferlab")

MODES = ("head",)


@dataclass
class TrainConfig:
    """Every option of ``transferlab train`` with its default.

    backbone: alias or timm name (default ``efficientnet_lite0``, weights bundled offline).
    mode: ``head`` trains a head on cached frozen features.
    head / dropout: MLP widths (empty: linear) and dropout. epochs / lr / batch_size: head training.
    val / test: split fractions when the data is not pre-split. seed: split and training seed.
    class_weights: ``balanced`` weights the loss by inverse class frequency.
    cache_dir: feature cache folder (default ``$TRANSFERLAB_HOME/cache``); no_cache disables it.
    """

    backbone: str = "efficientnet_lite0"
    mode: str = "head"
    pretrained: bool = True
    weights: str | None = None
    allow_download: bool | None = None
    cut_stage: int | None = None
    image_size: int | None = None
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    label_smoothing: float = 0.0
    class_weights: str | None = None
    seed: int = 0
    val: float = 0.15
    test: float = 0.15
    cache_dir: str | None = None
    no_cache: bool = False
    workers: int | None = None
    device: str | None = None
    mixed_precision: bool = True
    quiet: bool = False
    top_k: tuple[int, ...] = (1, 3, 5)

    def validate(self) -> "TrainConfig":
        """Check values; raises :class:`ConfigError` quoting the bad value."""
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}.")
        if self.class_weights not in (None, "none", "balanced"):
            raise ConfigError(f"class_weights {self.class_weights!r}: expected 'balanced' or none.")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1.")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be positive (for example 1e-3).")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1).")
        return self


@dataclass
class RunResult:
    """What a run produced: its directory, metrics and model folder."""

    run_dir: Path
    metrics: dict[str, Any]
    model_dir: Path
    warnings: list[str] = field(default_factory=list)


def default_run_dir() -> Path:
    """``runs/<date>-<time>`` in the current folder."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _features_by_split(ds: Dataset, extractor: FeatureExtractor, cache: FeatureCache | None,
                       skipped: list[Skipped]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, list[str]]], Dataset]:
    paths = [s.path for s in ds.samples]
    ext = extractor.extract(paths, cache)
    for i, reason in ext.errors.items():
        skipped.append(Skipped(paths[i], reason))
    keep = [s for s, ok in zip(ds.samples, ext.ok) if ok]
    feats = ext.features[ext.ok]
    index = {c: i for i, c in enumerate(ds.classes)}
    out = {}
    for split in ("train", "val", "test"):
        rows = [i for i, s in enumerate(keep) if s.split == split]
        out[split] = (feats[rows], np.array([index[keep[i].label] for i in rows], dtype=np.int64),
                      [keep[i].path for i in rows])
    extractor_stats = {"computed": ext.computed, "cached": ext.cached, "seconds": ext.seconds}
    ds = replace(ds, samples=keep)
    ds.infos["_extraction"] = extractor_stats  # type: ignore[assignment]
    return out, ds


def _probs(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()
    return softmax(logits)


def train(data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
          config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train a classifier on a labelled image folder and write a full run directory.

    Args:
        data: class folders, pre-split folders or a CSV manifest (a previous run's split.csv works).
        out: run directory (default ``runs/<date>-<time>``).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.

    Example:
        >>> result = train("photos/", "runs/photos", epochs=20)  # doctest: +SKIP
        >>> result.metrics["test"]["accuracy"]  # doctest: +SKIP
    """
    cfg = replace(config or TrainConfig(), **overrides).validate()
    t_start = time.perf_counter()
    run = Path(out) if out is not None else default_run_dir()
    run.mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(exist_ok=True)
    ds = split_dataset(scan(data), cfg.val, cfg.test, cfg.seed)
    skipped = list(ds.skipped)
    write_split_csv(ds.samples, run / "split.csv")
    write_skipped_csv(skipped, run / "skipped.csv")
    if not any(s.split == "train" for s in ds.samples):
        raise DataError(f"no training images in '{data}' after splitting.")

    backbone, info = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights_file=cfg.weights,
                                     allow_download=cfg.allow_download, cut_stage=cfg.cut_stage,
                                     image_size=cfg.image_size)
    extractor = FeatureExtractor(backbone, info, device=cfg.device, batch_size=cfg.batch_size,
                                 workers=cfg.workers, mixed_precision=cfg.mixed_precision, quiet=cfg.quiet)
    cache = None if cfg.no_cache else FeatureCache(cfg.cache_dir)
    t0 = time.perf_counter()
    splits, ds = _features_by_split(ds, extractor, cache, skipped)
    extract_s = time.perf_counter() - t0
    write_split_csv(ds.samples, run / "split.csv")
    write_skipped_csv(skipped, run / "skipped.csv")
    xtr, ytr, _ = splits["train"]
    xva, yva, pva = splits["val"]
    xte, yte, pte = splits["test"]
    n_classes = len(ds.classes)
    missing = sorted(set(range(n_classes)) - set(ytr.tolist()))
    if missing:
        raise DataError(f"class(es) {', '.join(repr(ds.classes[i]) for i in missing)} have no usable training image.")

    t1 = time.perf_counter()
    weights = balanced_class_weights(ytr, n_classes) if cfg.class_weights == "balanced" else None
    history = History(run / "logs" / "history.csv", "head")
    head_cfg = HeadConfig(hidden=tuple(cfg.head), dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, patience=cfg.patience,
                          label_smoothing=cfg.label_smoothing, class_weights=weights, seed=cfg.seed,
                          quiet=cfg.quiet)
    result = fit_head(xtr, ytr, xva, yva, n_classes, head_cfg, log_dir=run / "logs", history=history)
    train_s = time.perf_counter() - t1

    model = Classifier(backbone, result.head, info.preprocessing)
    val_res = SplitResult(yva, _probs(result.head, xva), pva) if len(yva) else None
    test_res = SplitResult(yte, _probs(result.head, xte), pte) if len(yte) else None
    counts = ds.counts()
    n_images = {s: int(sum(1 for x in ds.samples if x.split == s)) for s in ("train", "val", "test")}
    total_s = time.perf_counter() - t_start
    timing = {"extract_s": round(extract_s, 4), "train_s": round(train_s, 4), "total_s": round(total_s, 4),
              "features_computed": ds.infos["_extraction"]["computed"],  # type: ignore[index]
              "features_cached": ds.infos["_extraction"]["cached"]}  # type: ignore[index]
    summary = {"data": str(Path(data).resolve()), "layout": ds.layout, "classes": n_classes,
               "backbone": f"{info.name} ({info.timm_name})", "weights": f"{info.weights_origin} {info.weights_digest}",
               "mode": cfg.mode, "image size": info.preprocessing.size,
               "head": "linear" if not cfg.head else "MLP " + ",".join(map(str, cfg.head)),
               "epochs run": result.epochs_run, "best epoch": result.best_epoch, "seed": cfg.seed,
               "extract (s)": f"{extract_s:.1f}", "train (s)": f"{train_s:.1f}", "total (s)": f"{total_s:.1f}"}
    metrics = write_run_outputs(run, labels=ds.classes, test=test_res, val=val_res, history=history.rows,
                                summary=summary, counts=counts, skipped=[(k.path, k.reason) for k in skipped],
                                extra_metrics={"timing": timing, "backbone": info.name, "n_images": n_images,
                                               "mode": cfg.mode},
                                title=f"transferlab: {Path(data).name}", top_k=cfg.top_k)
    model_cfg = {
        "classes": ds.classes,
        "backbone": info.to_dict(),
        "preprocessing": info.preprocessing.to_dict(),
        "head": {"in_features": info.num_features, "hidden": list(cfg.head), "dropout": cfg.dropout},
        "calibration": {"temperature": 1.0},
        "training": {"mode": cfg.mode, "config": _jsonable(asdict(cfg)), "epochs_run": result.epochs_run,
                     "best_epoch": result.best_epoch, "n_images": n_images, "data": str(Path(data).resolve()),
                     "split_csv": str((run / "split.csv").resolve())},
        "metrics": {"test_accuracy": (metrics.get("test") or {}).get("accuracy"),
                    "test_macro_f1": (metrics.get("test") or {}).get("macro_f1"),
                    "val_accuracy": (metrics.get("val") or {}).get("accuracy")},
    }
    model_dir = save_artifact(run / "model", model, model_cfg)
    return RunResult(run, metrics, model_dir)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def evaluate(model: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
             *, split: str | None = None, quiet: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Evaluate a saved model on a labelled folder (every image, or only ``split`` of a pre-split one)
    and write metrics.json, plots, predictions.csv and report.html into ``out``."""
    predictor = load_model(model)
    ds = scan(data)
    samples = [s for s in ds.samples if split is None or s.split == split]
    unknown = sorted({s.label for s in samples} - set(predictor.classes))
    if unknown:
        raise DataError(f"class(es) {', '.join(map(repr, unknown))} in '{data}' are not classes of this model "
                        f"({', '.join(predictor.classes)}).")
    if workers is not None:
        predictor.workers = workers
    else:
        from .features.extract import default_workers

        predictor.workers = default_workers()
    t0 = time.perf_counter()
    probs, errors = predictor.predict_proba([s.path for s in samples])
    skipped = list(ds.skipped) + [Skipped(s.path, e) for s, e in zip(samples, errors) if e]
    ok = [i for i, e in enumerate(errors) if e is None]
    index = {c: i for i, c in enumerate(predictor.classes)}
    res = SplitResult([index[samples[i].label] for i in ok], probs[ok], [samples[i].path for i in ok])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_skipped_csv(skipped, out / "skipped.csv")
    counts: dict[str, dict[str, int]] = {c: {} for c in predictor.classes}
    for i in ok:
        s = samples[i]
        counts[s.label][s.split or "all"] = counts[s.label].get(s.split or "all", 0) + 1
    cfg = predictor.config
    summary = {"model": str(Path(model).resolve()), "data": str(Path(data).resolve()),
               "backbone": cfg["backbone"].get("name"), "images evaluated": len(ok),
               "evaluate (s)": f"{time.perf_counter() - t0:.1f}"}
    return write_run_outputs(out, labels=predictor.classes, test=res, val=None, history=[], summary=summary,
                             counts=counts, skipped=[(k.path, k.reason) for k in skipped],
                             extra_metrics={"backbone": cfg["backbone"].get("name"),
                                            "n_images": {"test": len(ok)},
                                            "timing": {"total_s": round(time.perf_counter() - t0, 4)}},
                             title=f"transferlab evaluation: {Path(data).name}")
