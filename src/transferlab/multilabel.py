"""The multi-label task's last stage (``--task multilabel``): a threshold per label tuned on validation,
the artifact, metrics and report; and ``evaluate`` of a multi-label model.

The stages before it are every task's (:mod:`transferlab.stages`); :class:`transferlab.tasks.MultiLabel`
says what differs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .artifacts import save_artifact
from .data.scan import Dataset, Sample, Skipped
from .data.split import write_skipped_csv, write_split_csv
from .errors import DataError
from .evaluation.multilabel import MultiLabelResult, write_multilabel_outputs
from .finish import RunResult, finetune_record, jsonable, run_timing
from .predict import Predictor
from .sharing import distributed_record
from .training.multilabel import label_matrix, tune_thresholds

if TYPE_CHECKING:
    from .stages import Prepared, Trained
    from .training.plan import Plan

__all__ = ["finish_multilabel", "evaluate_multilabel"]


def finish_multilabel(p: Prepared, t: Trained, plan: Plan | None) -> RunResult:
    """Tune each label's threshold on validation (0.5 without validation images), save the artifact,
    write metrics, plots and the report."""
    cfg, ds, info, ft, run = p.cfg, t.ds, t.info, t.ft, p.run
    classes = ds.classes
    val, test = t.results.get("val"), t.results.get("test")
    thresholds = tune_thresholds(val.probs, val.y_true) if val is not None and len(val.y_true) else \
        np.full(len(classes), 0.5)
    write_split_csv(ds.samples, run / "split.csv", ds.task)
    write_skipped_csv(p.skipped, run / "skipped.csv")
    counts = ds.split_sizes()
    warnings = list(p.notes)
    if val is None or not len(val.y_true):
        warnings.append("no validation images: every label's threshold is 0.5 (not tuned).")
    if ft is not None and not ft.improved:
        warnings.append("fine-tuning did not beat the head on the validation split; the head was kept.")
    timing, total_s = run_timing(p, t)
    model_cfg = {
        "classes": classes, "task": "multilabel", "thresholds": [float(v) for v in thresholds],
        "backbone": info.to_dict(), "preprocessing": info.preprocessing.to_dict(),
        "head": {"in_features": info.num_features, "hidden": [], "dropout": 0.0, "kind": "linear"},
        "calibration": {"temperature": 1.0, "fitted_on": None},
        "training": {"mode": cfg.mode, "config": jsonable(asdict(cfg)), "n_images": counts,
                     "head_epochs": t.stats.epochs_run, "finetune_epochs": ft.epochs_run if ft else 0,
                     "data": str(Path(p.data).resolve()), "split_csv": str((run / "split.csv").resolve())},
    }
    model_dir = save_artifact(run / "model", t.model.cpu().to(memory_format=torch.contiguous_format), model_cfg)
    summary = {"data": str(Path(p.data).resolve()), "layout": ds.layout, "task": "multi-label", "labels": len(classes),
               "backbone": f"{info.name} ({info.timm_name})", "mode": cfg.mode, "image size": info.preprocessing.size,
               "fine-tune epochs (best)": f"{ft.epochs_run} ({ft.best_epoch})" if ft else "—",
               "seed": cfg.seed, "total (s)": f"{total_s:.1f}"}
    metrics = write_multilabel_outputs(
        run, model=t.model, labels=classes, thresholds=thresholds, test=test, val=val, history=p.history.rows,
        summary=summary, counts=ds.counts(), skipped=[(k.path, k.reason) for k in p.skipped], warnings=warnings,
        title=f"transferlab: {Path(p.data).name}",
        extra_metrics={"timing": timing, "backbone": info.name, "n_images": counts, "mode": cfg.mode,
                       "distributed": distributed_record(p.world, t.stats, t.evaluated),
                       "plan": plan.to_dict() if plan else None, "finetune": finetune_record(ft, t.ft_s),
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
    res = MultiLabelResult(label_matrix([samples[i].labels for i in ok], predictor.classes), probs[ok],
                          [samples[i].path for i in ok])
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
