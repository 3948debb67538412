"""The stages of a training run and the small records they pass on.

:func:`transferlab.pipeline.train` calls them in order: :func:`head_stage` (extract and cache features,
fit the head on them), :func:`finetune_stage` (the race or the single recipe, then evaluation from the
files). Each takes the run's :class:`Prepared` inputs and the :class:`Trained` state so far and returns
the next :class:`Trained`. With several processes every rank runs every stage (they share extraction,
fine-tuning and evaluation); rank 0 alone fits the head, and the pipeline lets it alone finish.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .backbones.models import BackboneInfo, Classifier
from .config import TrainConfig
from .data.scan import Dataset, Skipped
from .data.transforms import TrainTransform
from .decisions import Decision, keeps_finetuned
from .distributed import World, broadcast_json, broadcast_module
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor, default_workers
from .orientation import OrientationCheck, TurnedView, judge_orientation
from .predict import Predictor
from .runtime import seed_cpu
from .sharing import EVAL_BLOCK, evaluation_shares, extraction_shares, predict_proba_shared, shared_start
from .strategy import run_strategy
from .tasks import Task
from .training.callbacks import History
from .training.finetune import FinetuneConfig, FinetuneResult, fit_finetune
from .training.openset import fit_knn_distance
from .training.plan import Plan

__all__ = ["Prepared", "HeadStats", "Trained", "head_stage", "orientation_stage", "finetune_stage", "finetune_config",
           "evaluate_files", "head_probs", "OPEN_SET_ACCEPT"]

#: Share of in-distribution (validation) images the open-set threshold accepts.
OPEN_SET_ACCEPT = 0.95
SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    """A run's checked inputs: where it writes, its options, the processes, the task, the split dataset
    (with the files skipped so far and the warnings for the user), the backbone, and its clocks."""

    run: Path
    data: str
    cfg: TrainConfig
    world: World
    task: Task
    ds: Dataset
    skipped: list[Skipped]
    notes: list[str]
    backbone: Any
    info: BackboneInfo
    history: History
    deadline: float | None
    resume: bool
    t_start: float
    wall_start: float


@dataclass
class HeadStats:
    """What the head stage measured and fitted besides the head (all zero when it did not run)."""

    extract_s: float = 0.0
    head_s: float = 0.0
    features_computed: int = 0
    features_cached: int = 0
    epochs_run: int = 0
    best_epoch: int | None = None
    head_kind: dict[str, Any] | None = None
    extracted_per_rank: list[int] | None = None
    evaluated_per_rank: list[int] | None = None
    openset: Any = None
    openset_test_accepted: float | None = None
    diagnosis: Any = None
    engine: dict[str, Any] | None = None  # which engine ran the extraction, and why
    extract_split: dict[str, float] | None = None  # of the extraction's seconds: waiting for decoding, forward passes


@dataclass
class Trained:
    """The run's network so far with the dataset it trained on (files that failed to decode dropped), the
    validation and test results of that network, and what each stage did."""

    model: Classifier
    info: BackboneInfo
    ds: Dataset
    results: dict[str, Any] = field(default_factory=dict)
    stats: HeadStats = field(default_factory=HeadStats)
    ft: FinetuneResult | None = None
    ft_s: float = 0.0
    evaluated: list[int] | None = None
    head_results: dict[str, Any] = field(default_factory=dict)  # the head's, kept when fine-tuning replaced them
    unkept_results: dict[str, Any] = field(default_factory=dict)  # the fine-tuned network's, when the head was kept


def head_probs(head: torch.nn.Module, x: np.ndarray, activate: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Probabilities of cached features ``x`` through ``head`` (the task's activation)."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()
    return activate(logits)


class _SeededView:
    """An augmentation whose randomness is fixed per (seed, view, file), so a cached view is reproducible."""

    def __init__(self, transform, seed: int, view: int) -> None:
        self.transform, self.seed, self.view = transform, seed, view
        self.draft = getattr(transform, "draft", None)

    def __call__(self, img):
        h = zlib.crc32(img.tobytes()[:4096]) ^ (self.seed * 7919 + self.view * 104729)
        seed_cpu(h)
        return self.transform(img)


def head_stage(p: Prepared, t: Trained) -> Trained:
    """Extract (cached) features of every image, fit the head on the training split's and score val and
    test with it. Files that fail to decode are skipped from here on. With several processes each
    extracts its share and all get every feature; rank 0 alone fits the head (the others keep an untrained
    one of the same shape, which the fine-tuning stage fills from rank 0's)."""
    cfg, task, world = p.cfg, p.task, p.world
    extractor, cache = _extractor(p, t.info)
    t0 = time.perf_counter()
    samples = t.ds.samples
    paths = [s.path for s in samples]
    ext = extractor.extract(paths, cache, world=world)
    p.skipped.extend(Skipped(paths[i], reason) for i, reason in ext.errors.items())
    keep = [s for s, ok in zip(samples, ext.ok) if ok]
    ds = replace(t.ds, samples=keep)
    feats, y = ext.features[ext.ok], task.targets(keep, ds.classes)
    rows = {sp: [i for i, s in enumerate(keep) if s.split == sp] for sp in SPLITS}
    xtr, ytr = feats[rows["train"]], y[rows["train"]]
    computed, cached = ext.computed, ext.cached
    if cfg.aug_views:
        train_paths = [keep[i].path for i in rows["train"]]
        for k in range(cfg.aug_views):
            preset = cfg.augment if cfg.augment not in ("none", "auto") else "light"
            aug = _SeededView(TrainTransform(t.info.preprocessing, preset), cfg.seed, k)
            view = extractor.extract(train_paths, cache, transform=aug, view=f"aug-{preset}-{cfg.seed}-{k}",
                                     description=f"Augmented view {k + 1}/{cfg.aug_views}", world=world)
            xtr = np.concatenate([xtr, view.features[view.ok]])
            ytr = np.concatenate([ytr, y[rows["train"]][view.ok]])
            computed, cached = computed + view.computed, cached + view.cached
    stats = HeadStats(extract_s=time.perf_counter() - t0, features_computed=computed, features_cached=cached,
                      extracted_per_rank=ext.per_rank,
                      evaluated_per_rank=extraction_shares(samples, ext.ok, world, extractor.batch_size),
                      engine=extractor.choice.to_dict() if extractor.choice else None,
                      extract_split={"waiting_for_decoding_s": round(ext.waited_s, 4),
                                     "forward_s": round(ext.forward_s, 4)})
    task.check_train(ytr, ds.classes)
    if not world.is_zero:
        return replace(t, ds=ds, stats=stats)
    t1 = time.perf_counter()
    xva, yva = feats[rows["val"]], y[rows["val"]]
    fit, stats.head_kind = task.fit_head(xtr, ytr, xva, yva, len(ds.classes), cfg, p.run / "logs", p.history)
    results = {sp: task.result(y[rows[sp]], head_probs(fit.head, feats[rows[sp]], task.activate),
                               [keep[i].path for i in rows[sp]]) for sp in ("val", "test") if rows[sp]}
    stats.head_s, stats.epochs_run, stats.best_epoch = time.perf_counter() - t1, fit.epochs_run, fit.best_epoch
    if task.diagnoses and len(yva) >= 20:  # open set: distance to the training images, calibrated on val
        stats.openset = fit_knn_distance(feats[rows["train"]], seed=cfg.seed)
        stats.openset.calibrate(xva, OPEN_SET_ACCEPT)
        if rows["test"]:
            stats.openset_test_accepted = float(np.mean(stats.openset.score(feats[rows["test"]])
                                                        <= stats.openset.threshold))
    if task.diagnoses and cfg.diagnose:  # features in memory: label issues and learning curve cost seconds
        from .diagnostics.training import diagnose_training

        train_samples = [keep[i] for i in rows["train"]]
        stats.diagnosis = diagnose_training(train_samples, feats[rows["train"]], y[rows["train"]], xva, yva,
                                            ds.classes, p.run, c=fit.c, seed=cfg.seed)
    model = Classifier(t.model.backbone, fit.head, t.model.preprocessing)
    return replace(t, model=model, ds=ds, results=results, stats=stats)


def _extractor(p: Prepared, info: BackboneInfo) -> tuple[FeatureExtractor, FeatureCache | None]:
    """The run's feature extractor and feature cache (``None`` with ``--no-cache``)."""
    cfg = p.cfg
    extractor = FeatureExtractor(p.backbone, info, device=cfg.device, workers=cfg.workers,
                                 mixed_precision=cfg.mixed_precision, quiet=cfg.quiet, engine=cfg.engine)
    return extractor, None if cfg.no_cache else FeatureCache(cfg.cache_dir)


def orientation_stage(p: Prepared, t: Trained) -> OrientationCheck | None:
    """Whether the data has an up (:mod:`transferlab.orientation`): the head scores the validation images
    turned (one extraction pass over them, cached) against upright. ``None`` where it cannot be judged: fewer
    than 20 validation images, several processes, or multi-label."""
    val = t.results.get("val")
    if val is None or len(val.y_true) < 20 or p.world.active or p.task.multilabel:
        return None
    t0 = time.perf_counter()
    extractor, cache = _extractor(p, t.info)
    turned = extractor.extract(val.paths, cache, transform=TurnedView(t.info.preprocessing, p.cfg.seed),
                               view=f"turned-{p.cfg.seed}", description="Turned validation images")
    probs = head_probs(t.model.head, turned.features[turned.ok], p.task.activate)
    upright = (val.probs.argmax(1) == val.y_true)[turned.ok]
    return judge_orientation(upright, probs.argmax(1) == val.y_true[turned.ok], time.perf_counter() - t0)


def finetune_stage(p: Prepared, t: Trained, decision: Decision, plan: Plan,
                   decided: Callable[[dict[str, Any]], None]) -> tuple[Trained, Plan]:
    """Fine-tune from the head (or a new one): race ``decision.candidates`` when there are any, else the
    single recipe; every rank then takes rank 0's weights and, unless the head was kept, evaluates from
    the files. ``decided`` is given the race's record before the survivor trains. Returns the new state
    and the plan with the race's record."""
    cfg, task, world, ds = p.cfg, p.task, p.world, t.ds
    train_s = [s for s in ds.samples if s.split == "train"]
    val_s = [s for s in ds.samples if s.split == "val"]
    ytr = task.targets(train_s, ds.classes)
    task.check_train(ytr, ds.classes)
    p.history.phase = "finetune"
    start = t.results.get("val") if decision.head and not p.resume else None
    initial = shared_start(world, t.model.head, task.val_loss(start.probs, start.y_true) if start else None)
    ft_cfg = finetune_config(cfg, plan, decision.head, p.deadline, initial_val_loss=initial,
                             class_weights=task.loss_weights(ytr, len(ds.classes)) if cfg.loss_weights else None,
                             multilabel=task.multilabel)
    train_xy = ([s.path for s in train_s], task.fit_targets(ytr))
    val_xy = ([s.path for s in val_s], task.fit_targets(task.targets(val_s, ds.classes)))
    info = t.info
    if decision.candidates:
        outcome = run_strategy(decision.candidates, t.model, info, ft_cfg, plan, native=plan.native_size,
                               train=train_xy, val=val_xy, run=p.run, history=p.history, n_classes=len(ds.classes),
                               head_trained=decision.head, resume=p.resume, winner=_saved_winner(p.run) if p.resume
                               else None, decided=decided)
        ft, info = outcome.ft, outcome.info
        plan = replace(plan, race=outcome.record)
    else:
        ft = fit_finetune(t.model, *train_xy, *val_xy, ft_cfg, p.run, p.history, resume=p.resume,
                          pretrained=info.pretrained)
    ft = _within_tolerance(ft, start, initial, task.multilabel, world)
    if ft.decisions:  # what the fit decided before it trained (the BatchNorm policy on cached activations)
        plan = replace(plan, decisions={**plan.decisions, **ft.decisions})
    model = broadcast_module(world, ft.model)  # every rank evaluates rank 0's weights
    results, evaluated, unkept = t.results, None, {}
    # evaluated again from the files, unless the head was kept (its results came from its features); then the
    # fine-tuned network that lost is scored on the test images in the time that evaluation would have taken
    if broadcast_json(world, bool(ft.improved or not results)):
        results = evaluate_files(model, ds, cfg, task, world, info)
        evaluated = evaluation_shares(ds, world)
    elif broadcast_json(world, ft.unkept is not None):
        unkept = evaluate_files(broadcast_module(world, ft.unkept), ds, cfg, task, world, info, splits=("test",))
    return replace(t, model=model, info=info, results=results, ft=ft, evaluated=evaluated,
                   head_results=t.results, unkept_results=unkept), plan


def _within_tolerance(ft: FinetuneResult, start: Any, initial_loss: float | None, multilabel: bool,
                      world: World) -> FinetuneResult:
    """A fine-tuning that did not beat the head's calibrated validation loss is kept all the same where
    :func:`~transferlab.decisions.keeps_finetuned` says the two cannot be told apart (rank 0 decides)."""
    keep = False
    if not (ft.improved or multilabel or start is None or initial_loss is None or ft.unkept_val is None
            or ft.unkept is None):
        head_acc = float(np.mean(start.probs.argmax(1) == start.y_true))
        keep = keeps_finetuned(head_acc, initial_loss, ft.unkept_val["val_acc"], ft.unkept_val["val_cal_loss"])
    if not broadcast_json(world, keep):
        return ft
    # every rank's record says so; rank 0's weights are the ones every rank evaluates
    return replace(ft, model=ft.unkept if ft.unkept is not None else ft.model, unkept=None, improved=True,
                   kept_by="tolerance", unkept_val=broadcast_json(world, ft.unkept_val))


def _saved_winner(run: Path) -> str | None:
    """The race's survivor recorded in an interrupted run's ``plan.json`` (``None``: none recorded)."""
    path = run / "plan.json"
    race = json.loads(path.read_text(encoding="utf-8")).get("race") if path.is_file() else None
    return (race or {}).get("winner")


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
        batch_size=cfg.ft_batch_size, patience=cfg.ft_patience, grad_clip=cfg.grad_clip,
        augment="light" if cfg.augment == "auto" else cfg.augment,
        mixup=cfg.ft_mixup, drop_path=cfg.ft_drop_path, class_weights=class_weights,
        balance_sampler=cfg.balance == "sampler", seed=cfg.seed,
        workers=default_workers() if cfg.workers is None else cfg.workers, accelerator=cfg.accelerator,
        devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        mixed_precision=cfg.mixed_precision, deadline=deadline, quiet=cfg.quiet,
        reserve_s=plan.estimate.get("evaluate", 15.0), initial_val_loss=initial_val_loss, multilabel=multilabel)


def evaluate_files(model: Classifier, ds: Dataset, cfg: TrainConfig, task: Task, world: World,
                   info: BackboneInfo, splits: Sequence[str] = ("val", "test")) -> dict[str, Any]:
    """Val and test results through the same path as ``predict`` (files -> Predictor), as ``task`` reads
    them. With several processes each predicts its share (:func:`evaluation_shares`) and every rank gets
    the whole result."""
    predictor = Predictor(model, {"classes": ds.classes, "preprocessing": model.preprocessing.to_dict(),
                                  "task": ds.task, "backbone": info.to_dict()}, device=cfg.device, mixed_precision=cfg.mixed_precision,
                          workers=default_workers() if cfg.workers is None else cfg.workers, batch_size=EVAL_BLOCK,
                          engine=cfg.engine)
    out: dict[str, Any] = {}
    for sp in splits:
        samples = [s for s in ds.samples if s.split == sp]
        if not samples:
            continue
        probs, errors = predict_proba_shared(predictor, [s.path for s in samples], world, calibrated=False)
        ok = [i for i, e in enumerate(errors) if e is None]
        kept = [samples[i] for i in ok]
        out[sp] = task.result(task.targets(kept, ds.classes), probs[ok], [s.path for s in kept])
    return out
