"""The multi-label job (``--task multilabel``): train on cached features (and fine-tune), tune a threshold
per label on validation, evaluate, save; and ``evaluate`` of a multi-label model.

:func:`~transferlab.pipeline.train` hands over here once the data is scanned and split and the plan made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .artifacts import save_artifact
from .backbones.models import Classifier, build_head
from .data.scan import Dataset, Sample, Skipped
from .data.split import write_skipped_csv, write_split_csv
from .errors import ConfigError, DataError
from .evaluation.calibration import multilabel_nll
from .evaluation.multilabel import MultiLabelResult, write_multilabel_outputs
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor
from .distributed import SINGLE, World, broadcast_json, broadcast_module
from .pipeline import RunResult, TrainConfig, _finetune_record, _jsonable, evaluate_files, finetune_config, head_probs
from .sharing import distributed_record, evaluation_shares, extraction_shares, shared_plan, shared_start
from .planning import plan_finetune
from .predict import Predictor
from .training.callbacks import History
from .training.finetune import fit_finetune
from .probability import sigmoid
from .training.multilabel import fit_multilabel_probe, label_matrix, pos_weights, tune_thresholds
from .training.plan import Plan

__all__ = ["train_multilabel", "evaluate_multilabel"]

log = logging.getLogger("transferlab")


def _check_options(cfg: TrainConfig) -> None:
    """Options that have no multi-label meaning are refused rather than ignored."""
    refused = {"mode knn": cfg.mode == "knn", "--head widths (an MLP)": bool(cfg.head),
               "--aug-views": cfg.aug_views > 0, "--balance sampler": cfg.balance == "sampler"}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not available for a multi-label task; a multi-label model has a "
                          "linear sigmoid head, and --balance weights weighs each label's positives by its rarity.")


def _split(samples: Sequence[Sample], split: str) -> list[Sample]:
    return [s for s in samples if s.split == split]


def _matrix(samples: Sequence[Sample], classes: list[str]) -> np.ndarray:
    return label_matrix([s.labels for s in samples], classes)


def train_multilabel(run: Path, data: Any, ds: Dataset, cfg: TrainConfig, backbone: Any, info: Any, plan: Plan,
                     use_head: bool, use_ft: bool, skipped: list[Skipped], audit_warnings: Sequence[str],
                     t_start: float, wall_start: float, deadline: float | None, resume: bool,
                     world: World = SINGLE) -> RunResult:
    """Train a multi-label classifier: the head on cached features (sigmoid outputs, binary cross-entropy;
    with ``--balance weights`` positives weighted per label), then fine-tuning with the same loss when the mode asks for it and it
    beats the head on validation; thresholds tuned per label on validation; metrics, report, artifact. With
    several processes (``world``) they share extraction and evaluation as in :func:`~transferlab.pipeline.train`."""
    _check_options(cfg)
    history = History(run / "logs" / "history.csv", "head")
    classes = ds.classes
    results: dict[str, MultiLabelResult] = {}
    stats: dict[str, Any] = {"extract_s": 0.0, "head_s": 0.0, "features_computed": 0, "features_cached": 0,
                             "epochs_run": 0}
    head = build_head(info.num_features, len(classes))
    if use_head:
        extractor = FeatureExtractor(backbone, info, device=cfg.device, workers=cfg.workers,
                                     mixed_precision=cfg.mixed_precision, quiet=cfg.quiet)
        t0 = time.perf_counter()
        ext = extractor.extract([s.path for s in ds.samples], None if cfg.no_cache else FeatureCache(cfg.cache_dir),
                                world=world)
        skipped.extend(Skipped(ds.samples[i].path, reason) for i, reason in ext.errors.items())
        ds_all = ds.samples
        ds = replace(ds, samples=[s for s, ok in zip(ds.samples, ext.ok) if ok])
        feats = ext.features[ext.ok]
        rows = {sp: [i for i, s in enumerate(ds.samples) if s.split == sp] for sp in ("train", "val", "test")}
        y = _matrix(ds.samples, classes)
        stats.update(extract_s=time.perf_counter() - t0, features_computed=ext.computed, features_cached=ext.cached,
                     extracted_per_rank=ext.per_rank,
                     evaluated_per_rank=extraction_shares(ds_all, ext.ok, world, extractor.batch_size))
    if use_head and world.is_zero:
        t1 = time.perf_counter()
        fit = fit_multilabel_probe(feats[rows["train"]], y[rows["train"]], feats[rows["val"]], y[rows["val"]],
                                   history=history, pos_weight=pos_weights(y[rows["train"]]) if cfg.loss_weights else None)
        head = fit.head
        stats.update(head_s=time.perf_counter() - t1, epochs_run=fit.epochs_run, best_epoch=fit.best_epoch)
        results = {sp: MultiLabelResult(y[rows[sp]], head_probs(head, feats[rows[sp]], sigmoid), [ds.samples[i].path for i in rows[sp]])
                   for sp in ("val", "test") if rows[sp]}
    model = Classifier(backbone, head, info.preprocessing)
    ft, t_ft = None, time.perf_counter()
    if use_ft:
        plan = shared_plan(world, lambda: plan_finetune(plan, ds, cfg, model, info, stats, wall_start))
        use_ft = plan.finetune
    if not use_ft and not world.is_zero:
        return RunResult(run, {}, run / "model", is_global_zero=False)
    evaluated = None
    if use_ft:
        train_s, val_s = _split(ds.samples, "train"), _split(ds.samples, "val")
        ytr = _matrix(train_s, classes)
        history.phase = "finetune"
        initial = shared_start(world, model.head, multilabel_nll(results["val"].probs, results["val"].y_true)
                               if use_head and not resume and "val" in results else None)
        ft_cfg = finetune_config(cfg, plan, use_head, deadline, initial_val_loss=initial, multilabel=True,
                                 class_weights=pos_weights(ytr).tolist() if cfg.loss_weights else None)
        ft = fit_finetune(model, [s.path for s in train_s], ytr.astype(np.int64).tolist(), [s.path for s in val_s],
                          _matrix(val_s, classes).astype(np.int64).tolist(), ft_cfg, run, history, resume=resume,
                          pretrained=info.pretrained)
        model = broadcast_module(world, ft.model)
        if broadcast_json(world, bool(ft.improved or not results)):
            results = evaluate_files(model, ds, cfg, world)
            evaluated = evaluation_shares(ds, world)
        if not world.is_zero:
            return RunResult(run, {}, run / "model", is_global_zero=False)
    ft_s = time.perf_counter() - t_ft if use_ft else 0.0
    val = results.get("val")
    thresholds = tune_thresholds(val.probs, val.y_true) if val is not None and len(val.y_true) else \
        np.full(len(classes), 0.5)
    write_split_csv(ds.samples, run / "split.csv", ds.task)
    write_skipped_csv(skipped, run / "skipped.csv")
    n_images = {s: len(_split(ds.samples, s)) for s in ("train", "val", "test")}
    warnings = list(audit_warnings)
    if val is None or not len(val.y_true):
        warnings.append("no validation images: every label's threshold is 0.5 (not tuned).")
    if ft is not None and not ft.improved:
        warnings.append("fine-tuning did not beat the head on the validation split; the head was kept.")
    total_s = time.perf_counter() - t_start
    timing = {"extract_s": round(stats["extract_s"], 4), "head_s": round(stats["head_s"], 4),
              "finetune_s": round(ft_s, 4), "train_s": round(stats["head_s"] + ft_s, 4), "total_s": round(total_s, 4),
              "features_computed": stats["features_computed"], "features_cached": stats["features_cached"]}
    model_cfg = {
        "classes": classes, "task": "multilabel", "thresholds": [float(t) for t in thresholds],
        "backbone": info.to_dict(), "preprocessing": info.preprocessing.to_dict(),
        "head": {"in_features": info.num_features, "hidden": [], "dropout": 0.0, "kind": "linear"},
        "calibration": {"temperature": 1.0, "fitted_on": None},
        "training": {"mode": cfg.mode, "config": _jsonable(asdict(cfg)), "n_images": n_images,
                     "head_epochs": stats["epochs_run"], "finetune_epochs": ft.epochs_run if ft else 0,
                     "data": str(Path(data).resolve()), "split_csv": str((run / "split.csv").resolve())},
    }
    test = results.get("test")
    model_dir = save_artifact(run / "model", model.cpu().to(memory_format=torch.contiguous_format), model_cfg)
    summary = {"data": str(Path(data).resolve()), "layout": ds.layout, "task": "multi-label", "labels": len(classes),
               "backbone": f"{info.name} ({info.timm_name})", "mode": cfg.mode, "image size": info.preprocessing.size,
               "fine-tune epochs (best)": f"{ft.epochs_run} ({ft.best_epoch})" if ft else "—",
               "seed": cfg.seed, "total (s)": f"{total_s:.1f}"}
    metrics = write_multilabel_outputs(
        run, model=model, labels=classes, thresholds=thresholds, test=test, val=val, history=history.rows,
        summary=summary, counts=ds.counts(), skipped=[(k.path, k.reason) for k in skipped], warnings=warnings,
        title=f"transferlab: {Path(data).name}",
        extra_metrics={"timing": timing, "backbone": info.name, "n_images": n_images, "mode": cfg.mode,
                       "distributed": distributed_record(world, stats, evaluated),
                       "plan": plan.to_dict(), "finetune": _finetune_record(ft, ft_s),
                       "stopped_by_time": bool(ft and ft.stopped_by_time)})
    return RunResult(run, metrics, model_dir, warnings)


def evaluate_multilabel(predictor: Predictor, ds: Dataset, samples: list[Sample], model_path: Any, data: Any,
                        out: Path) -> dict[str, Any]:
    """``evaluate`` for a multi-label model on a labelled folder or manifest (labels must be the model's)."""
    unknown = sorted({c for s in samples for c in s.labels} - set(predictor.classes))
    if unknown:
        raise DataError(f"label(s) {', '.join(map(repr, unknown))} in '{data}' are not labels of this model "
                        f"({', '.join(predictor.classes)}).")
    t0 = time.perf_counter()
    probs, errors = predictor.predict_proba([s.path for s in samples])
    ok = [i for i, e in enumerate(errors) if e is None]
    res = MultiLabelResult(_matrix([samples[i] for i in ok], predictor.classes), probs[ok], [samples[i].path for i in ok])
    skipped = list(ds.skipped) + [Skipped(s.path, e) for s, e in zip(samples, errors) if e]
    out.mkdir(parents=True, exist_ok=True)
    write_skipped_csv(skipped, out / "skipped.csv")
    counts = replace(ds, samples=[samples[i] for i in ok], classes=list(predictor.classes)).counts()
    summary = {"model": str(Path(model_path).resolve()), "data": str(Path(data).resolve()), "task": "multi-label",
               "backbone": predictor.config["backbone"].get("name"), "images evaluated": len(ok),
               "evaluate (s)": f"{time.perf_counter() - t0:.1f}"}
    return write_multilabel_outputs(
        out, model=predictor.model, labels=predictor.classes, thresholds=predictor.thresholds, test=res, val=None,
        history=[], summary=summary, counts=counts, skipped=[(k.path, k.reason) for k in skipped],
        title=f"transferlab evaluation: {Path(data).name}",
        extra_metrics={"backbone": predictor.config["backbone"].get("name"), "n_images": {"test": len(ok)},
                       "timing": {"total_s": round(time.perf_counter() - t0, 4)}})
