"""The last stage of a run: calibration, the artifact, metrics, plots and the report (rank 0 alone).

:func:`finish_single_label` is the single-label task's; the multi-label one is
:func:`transferlab.multilabel.finish_multilabel`. Both save the model before anything else, so that a
failure in the report (or a full disk) never throws a trained model away.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .artifacts import save_artifact
from .data.split import write_skipped_csv, write_split_csv
from .decisions import LOSS_TOLERANCE
from .evaluation.calibration import expected_calibration_error
from .evaluation.metrics import classification_metrics
from .evaluation.outputs import SplitResult, write_run_outputs
from .evaluation.race_report import race_section
from .evaluation.sections import report_sections
from .probability import apply_temperature, fit_temperature
from .sharing import distributed_record
from .strategy import budget_record, decision_record
from .training.finetune import FinetuneResult

if TYPE_CHECKING:
    from .stages import Prepared, Trained
    from .training.plan import Plan

__all__ = ["candidates_record", "RunResult", "finish_single_label", "finetune_record", "jsonable", "kept_warnings",
           "run_timing"]


@dataclass
class RunResult:
    """What a run produced: its directory, metrics and model folder (``is_global_zero`` False on the
    other ranks of a distributed run, which write nothing)."""

    run_dir: Path
    metrics: dict[str, Any]
    model_dir: Path
    warnings: list[str] = field(default_factory=list)
    is_global_zero: bool = True


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """A config's fields as JSON takes them (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def finetune_record(ft: FinetuneResult | None, seconds: float) -> dict[str, Any] | None:
    """What fine-tuning did: every validation pass, whether its result was kept, and why it stopped."""
    if ft is None:
        return None
    return {"seconds": round(seconds, 2), **ft.to_record()}


def kept_warnings(ft: FinetuneResult | None) -> list[str]:
    """What the user is told when the head was kept, or when the fine-tuned network was kept within the
    tolerance (:func:`~transferlab.decisions.keeps_finetuned`)."""
    if ft is not None and not ft.improved:
        why = " (stopped once a third of the budget had gone without gain)" if ft.stopped_unpaid else ""
        return [f"fine-tuning did not beat the head on the validation split{why}; the head was kept."]
    if ft is not None and ft.kept_by == "tolerance" and ft.unkept_val:
        v = ft.unkept_val
        return [f"fine-tuning did not beat the head's calibrated validation loss, but it was as accurate (val "
                f"{v['val_acc']:.4f}) and its calibrated loss, {v['val_cal_loss']:.4f}, was within "
                f"{LOSS_TOLERANCE:.0%} of the head's: the fine-tuned network was kept (a validation split this "
                "size cannot separate them)."]
    return []


def candidates_record(t: Trained) -> dict[str, Any] | None:
    """The head's and the fine-tuned network's accuracies, whichever was kept (the other is information too):
    the head's on validation and test from its features, the fine-tuned one's best validation and its test
    accuracy from the files (when the head was kept, of the weights the fine-tuning ended with)."""
    if t.ft is None or not t.head_results:
        return None

    def accuracy(res: Any) -> float | None:
        return round(float(np.mean(res.probs.argmax(1) == res.y_true)), 4) if res is not None and len(res.y_true) else None

    kept = "finetuned" if t.ft.improved else "head"
    finetuned = t.results if kept == "finetuned" else t.unkept_results
    val_accs = [v["val_acc"] for v in t.ft.validations if v.get("val_acc") is not None]
    return {"kept": kept, **({"kept_by": t.ft.kept_by} if kept == "finetuned" else {}),
            "head": {"val_accuracy": accuracy(t.head_results.get("val")),
                     "test_accuracy": accuracy(t.head_results.get("test"))},
            "finetuned": {"best_val_accuracy": round(max(val_accs), 4) if val_accs else None,
                          "test_accuracy": accuracy(finetuned.get("test"))}}


def run_timing(p: Prepared, t: Trained) -> tuple[dict[str, Any], float]:
    """``metrics.json``'s ``timing`` and the run's total seconds so far."""
    total_s = time.perf_counter() - p.t_start
    st = t.stats
    return {"extract_s": round(st.extract_s, 4), "train_s": round(st.head_s + t.ft_s, 4), "total_s": round(total_s, 4),
            "head_s": round(st.head_s, 4), "finetune_s": round(t.ft_s, 4), "features_computed": st.features_computed,
            "features_cached": st.features_cached, "engine": st.engine, "extract_split": st.extract_split}, total_s


def _calibrate(results: dict[str, SplitResult]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Fit temperature scaling on the validation split and apply it to val and test in place; returns
    the calibration record and the validation probabilities before scaling."""
    val = results.get("val")
    if val is None or len(val.y_true) < 2:
        return {"temperature": 1.0, "fitted_on": None}, None
    val_before = val.probs.copy()
    before = expected_calibration_error(val.probs, val.y_true)
    t = fit_temperature(val.probs, val.y_true)
    for res in results.values():
        res.probs = apply_temperature(res.probs, t)
    after = expected_calibration_error(val.probs, val.y_true)
    return {"temperature": t, "fitted_on": "val", "val_ece_before": before, "val_ece_after": after}, val_before


def finish_single_label(p: Prepared, t: Trained, plan: Plan | None) -> RunResult:
    """Calibrate on validation, save the artifact, write metrics, plots and the report."""
    cfg, ds, info, ft, st = p.cfg, t.ds, t.info, t.ft, t.stats
    run, results = p.run, t.results
    write_split_csv(ds.samples, run / "split.csv")
    write_skipped_csv(p.skipped, run / "skipped.csv")
    calibration, val_before = _calibrate(results)
    counts = ds.split_sizes()
    timing, total_s = run_timing(p, t)
    warnings = list(p.notes)
    budget = budget_record(cfg.time_limit, total_s, ft, cfg.ft_patience)
    warnings += kept_warnings(ft)
    if budget["still_improving"] and cfg.time_limit:
        warnings.append(f"fine-tuning was still improving when it ended (its last validation was its best): a "
                        f"--time-limit longer than {cfg.time_limit:g}s would likely pay.")
    if ft is not None and ft.stopped_by_time:
        warnings.append(f"training stopped by the time limit ({cfg.time_limit:g}s) after {ft.epochs_run} "
                        "fine-tuning epoch(s); the best model so far was evaluated and saved.")
    summary = {"data": str(Path(p.data).resolve()), "layout": ds.layout, "classes": len(ds.classes),
               "backbone": f"{info.name} ({info.timm_name})", "weights": f"{info.weights_origin} {info.weights_digest}",
               "mode": cfg.mode, "image size": info.preprocessing.size,
               "head": "linear" if not cfg.head else "MLP " + ",".join(map(str, cfg.head)),
               "head epochs (best)": f"{st.epochs_run} ({'-' if st.best_epoch is None else st.best_epoch})",
               "fine-tune epochs (best)": f"{ft.epochs_run} ({ft.best_epoch})" if ft else "—",
               "seed": cfg.seed, "extract (s)": f"{st.extract_s:.1f}", "train (s)": f"{timing['train_s']:.1f}",
               "total (s)": f"{total_s:.1f}"}
    if plan is not None and "orientation" in plan.decisions:
        o = plan.decisions["orientation"]
        summary["orientation"] = (f"{'no up: fine-tuned with turns' if o['no_up'] else 'has an up'} (head on "
                                  f"{o['n']} validation images: turned {o['turned']:.3f}, upright {o['upright']:.3f})")
    if plan is not None and "whole_network" in plan.decisions:
        summary["what fine-tunes"] = plan.decisions["whole_network"]["line"].split(": ", 1)[-1]
    if plan is not None and "bn_policy" in plan.decisions:
        summary["BatchNorm (trained stages)"] = plan.decisions["bn_policy"]["line"].split(": ", 1)[-1]
    if ft is not None and ft.cached:
        c = ft.cached
        summary["cached activations"] = (f"{c['views']} view(s) of {c['rows']} images ({c['bytes'] / 1e6:.0f} MB"
                                         f"{', on disk' if c['on_disk'] else ''}) in {c['cache_seconds']:.0f}s; "
                                         f"{c['epochs_per_minute']:.1f} epochs per minute")
    headline = {name: classification_metrics(res.y_true, res.probs, ds.classes, cfg.top_k)
                for name, res in results.items() if res is not None and len(res.y_true)}
    model_cfg = {
        "classes": ds.classes,
        "backbone": info.to_dict(),
        "preprocessing": info.preprocessing.to_dict(),
        "head": {"in_features": info.num_features, "hidden": list(cfg.head), "dropout": cfg.dropout,
                 **(st.head_kind or {"kind": "mlp" if cfg.head else "linear"})},
        "calibration": calibration,
        "training": {"mode": cfg.mode, "config": jsonable(asdict(cfg)), "n_images": counts,
                     "head_epochs": st.epochs_run, "finetune_epochs": ft.epochs_run if ft else 0,
                     "data": str(Path(p.data).resolve()), "split_csv": str((run / "split.csv").resolve()),
                     "decision": decision_record(plan.race if plan else None)},
        "metrics": {"test_accuracy": headline.get("test", {}).get("accuracy"),
                    "test_macro_f1": headline.get("test", {}).get("macro_f1"),
                    "val_accuracy": headline.get("val", {}).get("accuracy")},
    }
    # the open-set scorer describes the features it was fitted on: not those of a fine-tuned backbone
    openset = st.openset if not (ft and ft.improved) else None
    model_dir = save_artifact(run / "model", t.model.cpu().to(memory_format=torch.contiguous_format), model_cfg,
                              openset=openset)
    sections, extra = report_sections(t.model, ds.classes, results.get("test"), results.get("val"), calibration,
                                      val_before, seed=cfg.seed)
    if plan is not None and plan.race:
        sections = [race_section(plan.race, budget), *sections]
    if st.diagnosis is not None:
        sections, extra = sections + st.diagnosis.sections(), {**extra, **st.diagnosis.metrics()}
        warnings.extend(st.diagnosis.notes)
    metrics = write_run_outputs(run, labels=ds.classes, test=results.get("test"), val=results.get("val"),
                                history=p.history.rows, summary=summary, counts=ds.counts(),
                                skipped=[(k.path, k.reason) for k in p.skipped], warnings=warnings,
                                extra_metrics={"timing": timing, "backbone": info.name, "n_images": counts,
                                               "mode": cfg.mode, "stopped_by_time": bool(ft and ft.stopped_by_time),
                                               "calibration": calibration, "plan": plan.to_dict() if plan else None,
                                               "open_set": {**openset.record(), "test_accepted":
                                                            st.openset_test_accepted} if openset else None,
                                               "finetune": finetune_record(ft, t.ft_s),
                                               "strategy": plan.race if plan else None, "budget": budget,
                                               "head_and_finetuned": candidates_record(t),
                                               "distributed": distributed_record(p.world, t.stats, t.evaluated),
                                               **extra},
                                extra_sections=sections,
                                title=f"transferlab: {Path(p.data).name}", top_k=cfg.top_k)
    return RunResult(run, metrics, model_dir, warnings)
