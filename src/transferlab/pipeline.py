"""The main job, end to end: scan, split, extract/cache features, train, evaluate, save.

``train`` and ``evaluate`` are what the CLI commands of the same names call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch

from ._io import write_json
from .artifacts import save_artifact
from .config import TrainConfig, config_from_dict
from .backbones.models import Classifier, build_head, create_backbone
from .data.audit import audit, dedupe_across_splits
from .data.scan import Dataset, Sample, Skipped, scan
from .data.split import split_dataset, write_skipped_csv, write_split_csv
from .data.transforms import TrainTransform
from .distributed import SINGLE, World, broadcast_json, broadcast_module, first_launched, join, launch_layout
from .errors import ConfigError, DataError
from .evaluation.calibration import expected_calibration_error
from .evaluation.metrics import classification_metrics
from .evaluation.multilabel import MultiLabelResult
from .evaluation.outputs import SplitResult, write_run_outputs
from .evaluation.race_report import race_section
from .evaluation.sections import report_sections
from .events import emit
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor, default_workers
from .planning import plan_finetune, plan_run
from .predict import Predictor
from .probability import apply_temperature, calibrated_nll, fit_temperature, softmax
from .runtime import seed_cpu
from .sharing import (EVAL_BLOCK, distributed_record, evaluation_shares, extraction_shares, predict_proba_shared,
                      shared_plan, shared_start)
from .strategy import budget_record, decision_record, portfolio, run_strategy, skips_head, with_race_estimate
from .training.callbacks import History
from .training.finetune import FinetuneConfig, FinetuneResult, fit_finetune
from .training.plan import Plan
from .training.recipes import Recipe
from .training.head import HeadConfig, HeadResult, balanced_class_weights, fit_head, fit_probe
from .training.multilabel import label_matrix
from .training.openset import fit_knn_distance
from .training.prototypes import fit_prototypes

__all__ = ["TrainConfig", "RunResult", "train", "default_run_dir"]

log = logging.getLogger("transferlab")

#: Share of in-distribution (validation) images the open-set threshold accepts.
OPEN_SET_ACCEPT = 0.95


@dataclass
class RunResult:
    """What a run produced: its directory, metrics and model folder (``is_global_zero`` False on the
    other ranks of a distributed run, which write nothing)."""

    run_dir: Path
    metrics: dict[str, Any]
    model_dir: Path
    warnings: list[str] = field(default_factory=list)
    is_global_zero: bool = True


def default_run_dir() -> Path:
    """``runs/<date>-<time>`` in the current folder."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def head_probs(head: torch.nn.Module, x: np.ndarray, activate: Callable[[np.ndarray], np.ndarray] = softmax) -> np.ndarray:
    """Probabilities of cached features ``x`` through ``head`` (softmax; ``sigmoid`` for multi-label)."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()
    return activate(logits)


def _labels(samples: Sequence[Sample], classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[s.label] for s in samples], dtype=np.int64)


def _head_phase(ds: Dataset, cfg: TrainConfig, backbone, info, run: Path, skipped: list[Skipped],
                history: History, world: World = SINGLE) -> tuple[Any, dict[str, Any], Dataset, dict[str, SplitResult]]:
    """Extract (cached) features, train the head; returns head, stats, the usable dataset, val/test results.

    With several processes each extracts its share and all get every feature; rank 0 alone fits the head
    (the others return an untrained one of the same shape, which :func:`train` fills from rank 0's)."""
    extractor = FeatureExtractor(backbone, info, device=cfg.device, workers=cfg.workers,
                                 mixed_precision=cfg.mixed_precision, quiet=cfg.quiet)
    cache = None if cfg.no_cache else FeatureCache(cfg.cache_dir)
    t0 = time.perf_counter()
    paths = [s.path for s in ds.samples]
    ext = extractor.extract(paths, cache, world=world)
    evaluated = extraction_shares(ds.samples, ext.ok, world, extractor.batch_size)
    for i, reason in ext.errors.items():
        skipped.append(Skipped(paths[i], reason))
    keep = [s for s, ok in zip(ds.samples, ext.ok) if ok]
    feats = ext.features[ext.ok]
    ds = replace(ds, samples=keep)
    by = {sp: [i for i, s in enumerate(keep) if s.split == sp] for sp in ("train", "val", "test")}
    xtr, ytr = feats[by["train"]], _labels([keep[i] for i in by["train"]], ds.classes)
    computed, cached = ext.computed, ext.cached
    if cfg.aug_views:
        train_paths = [keep[i].path for i in by["train"]]
        for k in range(cfg.aug_views):
            aug = _SeededView(TrainTransform(info.preprocessing, cfg.augment if cfg.augment != "none" else "light"),
                              cfg.seed, k)
            view = extractor.extract(train_paths, cache, transform=aug, view=f"aug-{cfg.augment}-{cfg.seed}-{k}",
                                     description=f"Augmented view {k + 1}/{cfg.aug_views}", world=world)
            xtr = np.concatenate([xtr, view.features[view.ok]])
            ytr = np.concatenate([ytr, _labels([keep[by["train"][i]] for i in np.flatnonzero(view.ok)], ds.classes)])
            computed, cached = computed + view.computed, cached + view.cached
    extract_s = time.perf_counter() - t0
    n_classes = len(ds.classes)
    _check_train_classes(ytr, ds.classes)
    shared = {"extracted_per_rank": ext.per_rank, "evaluated_per_rank": evaluated}
    if not world.is_zero:
        return (build_head(info.num_features, n_classes, tuple(cfg.head), cfg.dropout),
                {"extract_s": extract_s, "head_s": 0.0, "features_computed": computed, "features_cached": cached,
                 **shared}, ds, {})
    t1 = time.perf_counter()
    weights = balanced_class_weights(ytr, n_classes) if cfg.loss_weights else None
    head_cfg = HeadConfig(hidden=tuple(cfg.head), dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, patience=cfg.patience,
                          label_smoothing=cfg.label_smoothing, class_weights=weights,
                          balance_sampler=cfg.balance == "sampler", seed=cfg.seed, quiet=cfg.quiet)
    xva, yva = feats[by["val"]], _labels([keep[i] for i in by["val"]], ds.classes)
    head_kind: dict[str, Any] = {"kind": "mlp" if cfg.head else "linear"}
    if cfg.mode == "knn":
        if cfg.head:
            raise ConfigError("--mode knn is a nearest-prototype model: it takes no --head widths.")
        proto, scale = fit_prototypes(xtr, ytr, xva, yva, n_classes)
        result, head_kind = HeadResult(proto), {"kind": "prototypes", "scale": scale, "normalize": True}
    elif cfg.head:
        result = fit_head(xtr, ytr, xva, yva, n_classes, head_cfg, log_dir=run / "logs", history=history)
    else:
        result = fit_probe(xtr, ytr, xva, yva, n_classes, head_cfg, history=history)
    results = {}
    for sp in ("val", "test"):
        if by[sp]:
            results[sp] = SplitResult(_labels([keep[i] for i in by[sp]], ds.classes), head_probs(result.head, feats[by[sp]]),
                                      [keep[i].path for i in by[sp]])
    stats = {"extract_s": extract_s, "head_s": time.perf_counter() - t1, "features_computed": computed,
             "features_cached": cached, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
             "head_kind": head_kind, **shared}
    if len(yva) >= 20:  # open set: distance to the training images, calibrated to accept 95% of val
        stats["openset"] = fit_knn_distance(feats[by["train"]], seed=cfg.seed)
        stats["openset"].calibrate(xva, OPEN_SET_ACCEPT)
        if by["test"]:
            stats["openset_test_accepted"] = float(np.mean(stats["openset"].score(feats[by["test"]])
                                                           <= stats["openset"].threshold))
    if cfg.diagnose:  # features in memory: label issues and learning curve cost seconds
        from .diagnostics.training import diagnose_training

        train_samples = [keep[i] for i in by["train"]]
        stats["diagnosis"] = diagnose_training(train_samples, feats[by["train"]], _labels(train_samples, ds.classes),
                                               xva, yva, ds.classes, run, c=result.c, seed=cfg.seed)
    return result.head, stats, ds, results


class _SeededView:
    """An augmentation whose randomness is fixed per (seed, view, file), so a cached view is reproducible."""

    def __init__(self, transform, seed: int, view: int) -> None:
        self.transform, self.seed, self.view = transform, seed, view
        self.draft = getattr(transform, "draft", None)

    def __call__(self, img):
        h = zlib.crc32(img.tobytes()[:4096]) ^ (self.seed * 7919 + self.view * 104729)
        seed_cpu(h)
        return self.transform(img)


def _check_train_classes(ytr: np.ndarray, classes: list[str]) -> None:
    missing = sorted(set(range(len(classes))) - set(ytr.tolist()))
    if missing:
        raise DataError(f"class(es) {', '.join(repr(classes[i]) for i in missing)} have no usable training image.")


def _load_resume(run: Path) -> tuple[str, TrainConfig]:
    path = run / "train_config.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume '{run}': it has no train_config.json (is it a transferlab run directory?).")
    saved = json.loads(path.read_text(encoding="utf-8"))
    return str(run / "split.csv"), TrainConfig(**config_from_dict(saved["config"], str(path), strict=False))


def _saved_winner(run: Path) -> str | None:
    """The race's survivor recorded in an interrupted run's ``plan.json`` (``None``: none recorded)."""
    path = run / "plan.json"
    race = json.loads(path.read_text(encoding="utf-8")).get("race") if path.is_file() else None
    return (race or {}).get("winner")


def _refuse_existing(run: Path, overwrite: bool) -> None:
    """A new run never writes into a folder that holds anything, unless ``overwrite`` is asked. Only the
    first process of a distributed run checks (the others start after it has written there)."""
    if overwrite or not run.exists() or not first_launched():
        return
    if not run.is_dir():
        raise ConfigError(f"--out '{run}' is a file; give a folder for the run.")
    if any(run.iterdir()):
        what = "a transferlab run" if (run / "train_config.json").is_file() else "files"
        raise ConfigError(f"--out '{run}' already holds {what}. Give a new folder, --overwrite to replace it, "
                          f"or --resume to continue it.")


def train(data: str | os.PathLike[str] | None, out: str | os.PathLike[str] | None = None,
          config: TrainConfig | None = None, resume: bool = False, started_at: float | None = None,
          overwrite: bool = False, **overrides: Any) -> RunResult:
    """Train a classifier on a labelled image folder and write a full run directory.

    Args:
        data: class folders, pre-split folders or a CSV manifest (a previous run's split.csv works).
            Ignored with ``resume``.
        out: run directory (default ``runs/<date>-<time>``).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        resume: continue the run in ``out`` from its last checkpoint, on its own split and options.
        overwrite: replace the run already in ``out`` (its checkpoints and logs are removed once the new run's data
            and backbone have loaded); without it a folder that holds anything is refused.
        started_at: ``time.time()`` when the user started the run (the CLI passes its start), from which
            ``time_limit`` counts; default now.

    Example:
        >>> result = train("photos/", "runs/photos", mode="auto", time_limit=900)  # doctest: +SKIP
        >>> result.metrics["test"]["accuracy"]  # doctest: +SKIP
    """
    t_start, wall_start = time.perf_counter(), started_at or time.time()
    run = Path(out) if out is not None else default_run_dir()
    if resume:
        data, saved = _load_resume(run)
        cfg = replace(saved, **overrides).validate()
    else:
        if data is None:
            raise ConfigError("give the DATA folder to train on (or --resume RUN).")
        cfg = replace(config or TrainConfig(), **overrides).validate()
        _refuse_existing(run, overwrite)
    # several processes (--devices N --strategy ddp, torchrun, srun) share every phase; rank 0 writes
    devices, num_nodes = launch_layout(cfg.devices, cfg.num_nodes)
    cfg = replace(cfg, devices=devices, num_nodes=num_nodes)  # torchrun's or SLURM's layout, when it has one
    world = join(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy)
    if not world.is_zero:
        cfg = replace(cfg, quiet=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    deadline = wall_start + cfg.time_limit if cfg.time_limit else None
    ds = split_dataset(scan(data, task=cfg.task), cfg.val, cfg.test, cfg.seed)
    skipped = list(ds.skipped)
    report = audit(ds)  # the cheap part: exact duplicates, leakage, imbalance
    if cfg.dedupe:
        kept, removed = dedupe_across_splits(ds.samples, report.exact_duplicates)
        ds, skipped = replace(ds, samples=kept), skipped + removed
        report = audit(ds)
    notes = list(report.warnings) + cfg.ignored()  # the data's problems and the options this run will not use
    for w in notes if world.is_zero else ():
        log.warning(w)
    if not any(s.split == "train" for s in ds.samples):
        raise DataError(f"no training images in '{data}' after splitting.")
    backbone, info = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights_file=cfg.weights,
                                     allow_download=cfg.allow_download, cut_stage=cfg.cut_stage,
                                     image_size=cfg.image_size)
    # data, backbone and weights are good: only now is anything of an earlier run replaced
    if world.is_zero:
        if overwrite and not resume:  # the old run's checkpoints and logs would mix in
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            shutil.rmtree(run / "logs", ignore_errors=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "logs").mkdir(exist_ok=True)
        if not resume:
            write_json(run / "train_config.json", {"data": str(Path(data).resolve()), "config": _jsonable(asdict(cfg))})
        write_split_csv(ds.samples, run / "split.csv", ds.task)
        write_skipped_csv(skipped, run / "skipped.csv")
    use_head = cfg.mode in ("head", "knn") or (cfg.mode == "auto" and info.pretrained)
    use_ft = cfg.mode == "finetune" or (cfg.mode == "auto")
    if resume and (run / "plan.json").is_file():  # a resumed run keeps its input size
        cfg = replace(cfg, image_size=json.loads((run / "plan.json").read_text(encoding="utf-8"))["image_size"])
    plan = shared_plan(world, lambda: plan_run(ds, cfg, backbone, info, use_ft, wall_start))
    info = replace(info, preprocessing=replace(info.preprocessing, size=plan.image_size))
    _announce(plan, run, world)
    if ds.task == "multilabel":
        from .multilabel import train_multilabel

        return train_multilabel(run, data, ds, cfg, backbone, info, plan, use_head, use_ft, skipped,
                                notes, t_start, wall_start, deadline, resume, world)
    candidates = None
    if cfg.recipe == "race" and use_ft and world.active:
        notes.append("--recipe race runs in one process: a distributed run trains the single recipe.")
        log.warning(notes[-1])
    elif cfg.recipe == "race" and use_ft:
        n_train = sum(1 for s in ds.samples if s.split == "train")
        candidates = portfolio(plan.native_size, n_train, info.pretrained, cfg.candidates)
        if use_head and skips_head(candidates):
            use_head = False
            plan.reasons.append(f"no frozen-feature head: the race is {' against '.join(c.name for c in candidates)} "
                                "(small images in large numbers)")
    history = History(run / "logs" / "history.csv", "head")
    stats: dict[str, Any] = {"extract_s": 0.0, "head_s": 0.0, "features_computed": 0, "features_cached": 0}
    results: dict[str, SplitResult] = {}
    n_classes = len(ds.classes)
    head = build_head(info.num_features, n_classes, tuple(cfg.head), cfg.dropout)
    if use_head:
        head, stats, ds, results = _head_phase(ds, cfg, backbone, info, run, skipped, history, world)
    model = Classifier(backbone, head, info.preprocessing)
    ft: FinetuneResult | None = None
    evaluated: list[int] | None = None
    t_ft = time.perf_counter()
    if use_ft:
        plan = shared_plan(world, lambda: plan_finetune(plan, ds, cfg, model, info, stats, wall_start))
        if not plan.finetune and not use_head:  # nothing would train: the cheapest thing that can
            candidates, plan, use_head = _cheapest(candidates, plan, info.pretrained)
            if use_head:
                head, stats, ds, results = _head_phase(ds, cfg, backbone, info, run, skipped, history, world)
                model = Classifier(backbone, head, info.preprocessing)
        if candidates and plan.finetune:
            plan = with_race_estimate(plan, candidates)
        _announce(plan, run, world)
        use_ft = plan.finetune
    if not use_ft and not world.is_zero:  # rank 0 alone evaluates the head and writes the run
        return RunResult(run, {}, run / "model", is_global_zero=False)
    if use_ft:
        train_s = [s for s in ds.samples if s.split == "train"]
        val_s = [s for s in ds.samples if s.split == "val"]
        ytr = _labels(train_s, ds.classes)
        _check_train_classes(ytr, ds.classes)
        history.phase = "finetune"
        initial = shared_start(world, model.head, calibrated_nll(results["val"].probs, results["val"].y_true)
                               if use_head and not resume and "val" in results else None)
        ft_cfg = finetune_config(cfg, plan, use_head, deadline, initial_val_loss=initial,
                                 class_weights=balanced_class_weights(ytr, n_classes) if cfg.loss_weights else None)
        train_xy = ([s.path for s in train_s], ytr.tolist())
        val_xy = ([s.path for s in val_s], _labels(val_s, ds.classes).tolist())
        if candidates:
            outcome = run_strategy(candidates, model, info, ft_cfg, plan, native=plan.native_size, train=train_xy,
                                   val=val_xy, run=run, history=history, n_classes=n_classes, head_trained=use_head,
                                   resume=resume, winner=_saved_winner(run) if resume else None,
                                   decided=lambda race: write_json(run / "plan.json", {**plan.to_dict(), "race": race}))
            ft, info = outcome.ft, outcome.info
            plan = replace(plan, race=outcome.record)
            write_json(run / "plan.json", plan.to_dict())
        else:
            ft = fit_finetune(model, *train_xy, *val_xy, ft_cfg, run, history, resume=resume,
                              pretrained=info.pretrained)
        model = broadcast_module(world, ft.model)  # every rank evaluates rank 0's weights
        # evaluated again from the files, unless the head was kept (its results came from its features)
        if broadcast_json(world, bool(ft.improved or not results)):
            results = evaluate_files(model, ds, cfg, world)
            evaluated = evaluation_shares(ds, world)
        if not world.is_zero:
            return RunResult(run, {}, run / "model", is_global_zero=False)
    ft_s = time.perf_counter() - t_ft if use_ft else 0.0
    stats["distributed"] = distributed_record(world, stats, evaluated)
    return _finish(run, data, ds, cfg, info, model, results, history, skipped, stats, ft, ft_s, t_start,
                   notes, plan)


def _cheapest(candidates: list[Recipe] | None, plan: Plan, pretrained: bool) -> tuple[list[Recipe] | None,
                                                                                            Plan, bool]:
    """What trains when the plan leaves no fine-tuning and no head was trained (a run never ends with an
    untrained network): the scratch CNN alone when the race has it (its epochs come from its own, far lower,
    measured cost), else the frozen-feature head of a pretrained backbone, else the share of an epoch the
    deadline allows. Returns the candidates, the plan and whether the head phase runs."""
    scratch = [c for c in candidates or () if c.name == "scratch"]
    if scratch:
        why = "the pretrained network does not fit in the budget: the scratch CNN alone trains, at its own cost"
        return scratch, replace(plan, finetune=True, epochs=max(plan.epochs, 1.0), reasons=[*plan.reasons, why]), False
    if pretrained:
        return None, replace(plan, reasons=[*plan.reasons, "the frozen-feature head is trained instead"]), True
    why = "half an epoch, which the deadline may cut: an untrained network is no result"
    return candidates, replace(plan, finetune=True, epochs=max(plan.epochs, 0.5), reasons=[*plan.reasons, why]), False


def finetune_config(cfg: TrainConfig, plan: Plan, use_head: bool, deadline: float | None, *,
                    class_weights: Sequence[float] | None, initial_val_loss: float | None,
                    multilabel: bool = False) -> FinetuneConfig:
    """The fine-tuning phase's options from the run's: a trained head starts unfrozen at the base rate, a
    new one gets twice it after a frozen epoch; the run's deadline and plan bound it."""
    return FinetuneConfig(
        epochs=plan.epochs, lr=cfg.ft_lr, freeze_epochs=0 if use_head else cfg.freeze_epochs,
        head_lr=None if use_head else 2 * cfg.ft_lr, val_every=plan.val_every,
        discard_after_s=plan.budget_s / 3 if plan.budget_s else None,  # without a limit: early stopping only
        unfreeze=cfg.unfreeze, frozen_stride=cfg.frozen_stride, weight_decay=cfg.weight_decay,
        label_smoothing=0.0 if multilabel else cfg.ft_label_smoothing,
        batch_size=cfg.ft_batch_size, patience=cfg.ft_patience, grad_clip=cfg.grad_clip, augment=cfg.augment,
        mixup=cfg.ft_mixup, drop_path=cfg.ft_drop_path, class_weights=class_weights,
        balance_sampler=cfg.balance == "sampler", seed=cfg.seed,
        workers=default_workers() if cfg.workers is None else cfg.workers, accelerator=cfg.accelerator,
        devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        mixed_precision=cfg.mixed_precision, deadline=deadline, quiet=cfg.quiet,
        reserve_s=plan.estimate.get("evaluate", 15.0), initial_val_loss=initial_val_loss, multilabel=multilabel)


def _announce(plan: Plan, run: Path, world: World = SINGLE) -> None:
    """Print the plan and keep it in the run directory (``plan.json``; ``metrics.json`` has it too); rank 0
    alone does."""
    if not world.is_zero:
        return
    emit("plan", lines=plan.describe(), estimate_s=plan.estimate.get("total"), budget_s=plan.budget_s)
    for line in plan.describe():
        log.info(line)
    write_json(run / "plan.json", plan.to_dict())


def evaluate_files(model: Classifier, ds: Dataset, cfg: TrainConfig, world: World = SINGLE) -> dict[str, Any]:
    """Val and test probabilities through the same path as ``predict`` (files -> Predictor): a
    :class:`SplitResult` per split, or a :class:`MultiLabelResult` for a multi-label dataset. With several
    processes each predicts its share (:func:`evaluation_shares`) and every rank gets the whole result."""
    predictor = Predictor(model, {"classes": ds.classes, "preprocessing": model.preprocessing.to_dict(),
                                  "task": ds.task}, device=cfg.device, mixed_precision=cfg.mixed_precision,
                          workers=default_workers() if cfg.workers is None else cfg.workers, batch_size=EVAL_BLOCK)
    out: dict[str, Any] = {}
    for sp in ("val", "test"):
        samples = [s for s in ds.samples if s.split == sp]
        if not samples:
            continue
        probs, errors = predict_proba_shared(predictor, [s.path for s in samples], world, calibrated=False)
        ok = [i for i, e in enumerate(errors) if e is None]
        kept = [samples[i] for i in ok]
        if ds.task == "multilabel":
            out[sp] = MultiLabelResult(label_matrix([s.labels for s in kept], ds.classes), probs[ok],
                                       [s.path for s in kept])
        else:
            out[sp] = SplitResult(_labels(kept, ds.classes), probs[ok], [s.path for s in kept])
    return out


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


def _finish(run: Path, data: Any, ds: Dataset, cfg: TrainConfig, info: Any, model: Classifier,
            results: dict[str, SplitResult], history: History, skipped: list[Skipped], stats: dict[str, Any],
            ft: FinetuneResult | None, ft_s: float, t_start: float, audit_warnings: Sequence[str] = (),
            plan: Plan | None = None) -> RunResult:
    write_split_csv(ds.samples, run / "split.csv")
    write_skipped_csv(skipped, run / "skipped.csv")
    calibration, val_before = _calibrate(results)
    n_images = {s: int(sum(1 for x in ds.samples if x.split == s)) for s in ("train", "val", "test")}
    train_s = stats["head_s"] + ft_s
    total_s = time.perf_counter() - t_start
    timing = {"extract_s": round(stats["extract_s"], 4), "train_s": round(train_s, 4), "total_s": round(total_s, 4),
              "head_s": round(stats["head_s"], 4), "finetune_s": round(ft_s, 4),
              "features_computed": stats["features_computed"], "features_cached": stats["features_cached"]}
    warnings = list(audit_warnings)
    budget = budget_record(cfg.time_limit, total_s, ft, cfg.ft_patience)
    if ft is not None and not ft.improved:
        why = " (stopped once a third of the budget had gone without gain)" if ft.stopped_unpaid else ""
        warnings.append(f"fine-tuning did not beat the head on the validation split{why}; the head was kept.")
    if ft is not None and ft.stopped_by_time:
        warnings.append(f"training stopped by the time limit ({cfg.time_limit:g}s) after {ft.epochs_run} "
                        "fine-tuning epoch(s); the best model so far was evaluated and saved.")
    summary = {"data": str(Path(data).resolve()), "layout": ds.layout, "classes": len(ds.classes),
               "backbone": f"{info.name} ({info.timm_name})", "weights": f"{info.weights_origin} {info.weights_digest}",
               "mode": cfg.mode, "image size": info.preprocessing.size,
               "head": "linear" if not cfg.head else "MLP " + ",".join(map(str, cfg.head)),
               "head epochs (best)": f"{stats.get('epochs_run', 0)} ({stats.get('best_epoch', '-')})",
               "fine-tune epochs (best)": f"{ft.epochs_run} ({ft.best_epoch})" if ft else "—",
               "seed": cfg.seed, "extract (s)": f"{stats['extract_s']:.1f}", "train (s)": f"{train_s:.1f}",
               "total (s)": f"{total_s:.1f}"}
    # the model is saved first: a failure in the report, the plots or Grad-CAM (or a full disk) never
    # throws a trained model away
    headline = {name: classification_metrics(res.y_true, res.probs, ds.classes, cfg.top_k)
                for name, res in results.items() if res is not None and len(res.y_true)}
    model_cfg = {
        "classes": ds.classes,
        "backbone": info.to_dict(),
        "preprocessing": info.preprocessing.to_dict(),
        "head": {"in_features": info.num_features, "hidden": list(cfg.head), "dropout": cfg.dropout,
                 **stats.get("head_kind", {"kind": "mlp" if cfg.head else "linear"})},
        "calibration": calibration,
        "training": {"mode": cfg.mode, "config": _jsonable(asdict(cfg)), "n_images": n_images,
                     "head_epochs": stats.get("epochs_run"), "finetune_epochs": ft.epochs_run if ft else 0,
                     "data": str(Path(data).resolve()), "split_csv": str((run / "split.csv").resolve()),
                     "decision": decision_record(plan.race if plan else None)},
        "metrics": {"test_accuracy": headline.get("test", {}).get("accuracy"),
                    "test_macro_f1": headline.get("test", {}).get("macro_f1"),
                    "val_accuracy": headline.get("val", {}).get("accuracy")},
    }
    # the open-set scorer describes the features it was fitted on: not those of a fine-tuned backbone
    openset = stats.get("openset") if not (ft and ft.improved) else None
    model_dir = save_artifact(run / "model", model.cpu().to(memory_format=torch.contiguous_format), model_cfg,
                              openset=openset)
    sections, extra = report_sections(model, ds.classes, results.get("test"), results.get("val"), calibration,
                                      val_before, seed=cfg.seed)
    if plan is not None and plan.race:
        sections = [race_section(plan.race, budget), *sections]
    diagnosis = stats.get("diagnosis")
    if diagnosis is not None:
        sections, extra = sections + diagnosis.sections(), {**extra, **diagnosis.metrics()}
        warnings.extend(diagnosis.notes)
    metrics = write_run_outputs(run, labels=ds.classes, test=results.get("test"), val=results.get("val"),
                                history=history.rows, summary=summary, counts=ds.counts(),
                                skipped=[(k.path, k.reason) for k in skipped], warnings=warnings,
                                extra_metrics={"timing": timing, "backbone": info.name, "n_images": n_images,
                                               "mode": cfg.mode, "stopped_by_time": bool(ft and ft.stopped_by_time),
                                               "calibration": calibration, "plan": plan.to_dict() if plan else None,
                                               "open_set": {**openset.record(), "test_accepted":
                                                            stats.get("openset_test_accepted")} if openset else None,
                                               "finetune": _finetune_record(ft, ft_s),
                                               "strategy": plan.race if plan else None, "budget": budget,
                                               "distributed": stats.get("distributed"), **extra},
                                extra_sections=sections,
                                title=f"transferlab: {Path(data).name}", top_k=cfg.top_k)
    return RunResult(run, metrics, model_dir, warnings)


def _finetune_record(ft: FinetuneResult | None, seconds: float) -> dict[str, Any] | None:
    """What fine-tuning did: every validation pass, whether its result was kept, and why it stopped."""
    if ft is None:
        return None
    return {"seconds": round(seconds, 2), **ft.to_record()}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
