"""The run's plan, made twice: before extraction (input size) and before fine-tuning (how long).

Glue between the pipeline and :mod:`transferlab.training.plan`: it measures this machine's costs on
the run's own backbone and files, and refines the fine-tuning length with the time actually left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from .backbones.models import BackboneInfo, Classifier, FeatureBackbone, build_head
from .data.scan import Dataset
from .features.extract import default_workers
from .training.cached import split_top, trains_cached
from .training.finetune import backbone_stages, early_stages
from .training.plan import CACHED_EPOCHS, Costs, Plan, candidate_sizes, epochs_fit, make_plan, measure_costs, \
    native_size, sample_paths, useful_size

__all__ = ["plan_run", "plan_finetune", "head_seconds"]

log = logging.getLogger("transferlab")


def _trainable(model: Classifier, info: BackboneInfo, frozen_stride: int, cached: bool = False) -> list[Any]:
    """The parameters a fine-tuning step updates: the top stages and the head when it trains on cached
    activations (its epochs then cost about a forward pass and the top's backward pass each), else all but
    the frozen early stages."""
    if cached:
        return list(split_top(model).upper.parameters())
    stages = backbone_stages(model.backbone)
    frozen = early_stages(model.backbone, stages, info.preprocessing.size, frozen_stride) if info.pretrained else 0
    return [p for s in stages[frozen:] for p in s] + list(model.head.parameters())


def plan_run(ds: Dataset, cfg: Any, backbone: FeatureBackbone, info: BackboneInfo, finetune: bool,
             started_at: float, cached: bool = False, whole_check: bool = False) -> Plan:
    """The first plan: input size (from the images' resolution and the budget) and a first estimate.

    ``cfg`` is the run's :class:`~transferlab.config.TrainConfig`; ``started_at`` the ``time.time()``
    from which its ``time_limit`` counts; ``cached``: fine-tuning trains the top stages on cached activations;
    ``whole_check``: under a time limit, the whole network trains instead where it fits as many epochs
    (:func:`_whole_or_top`).
    """
    n = ds.split_sizes()
    native = native_size(ds.infos)
    default = info.preprocessing.size
    if cfg.image_size:
        sizes = [int(cfg.image_size)]
    elif cfg.time_limit:
        cands = candidate_sizes(native, default)
        sizes = sorted({cands[0], cands[-1]})
    else:
        sizes = [useful_size(native, default, finetune)]
    model = Classifier(backbone, build_head(info.num_features, len(ds.classes)), info.preprocessing)
    cached = cached and trains_cached(model, cfg.accelerator)  # else the whole network trains end to end
    train_paths = [s.path for s in ds.samples if s.split == "train"]
    costs = measure_costs(model, info.preprocessing, sizes, sample_paths(train_paths, seed=cfg.seed),
                          batch_size=cfg.ft_batch_size, trainable=_trainable(model, info, cfg.frozen_stride, cached),
                          mixed_precision=cfg.mixed_precision, workers=_workers(cfg), train=finetune)
    if not finetune:
        costs = Costs(costs.eval_s, {s: 0.0 for s in costs.eval_s})
    parts = dict(native=native, n_extract=len(ds.samples), n_train=n["train"], n_val=n["val"], n_test=n["test"],
                 finetune=finetune, budget_s=cfg.time_limit, max_epochs=cfg.ft_epochs, head_s=head_seconds(n["train"]))
    plan = make_plan(default_size=default, costs=costs, elapsed_s=time.time() - started_at,
                     image_size=cfg.image_size, cached=cached, **parts)
    if cached and whole_check and plan.finetune and cfg.time_limit:
        plan = _whole_or_top(plan, model, info, cfg, train_paths, parts, started_at)
    return replace(plan, task=ds.task)


def _whole_or_top(plan: Plan, model: Classifier, info: BackboneInfo, cfg: Any, train_paths: list[str],
                  parts: dict[str, Any], started_at: float) -> Plan:
    """Whether the whole network's fine-tuning fits the epochs a fit of the top stages on cached activations is
    planned for, at that plan's input size, in the budget: if it does, the cheaper epochs buy nothing the whole
    network cannot do (adapting every stage, fresh augmentation each epoch), and the plan is the whole
    network's, marked ``decisions["whole_network"]["whole"]``; else the top stages' plan, with the figures."""
    top, size = plan, plan.image_size
    whole = measure_costs(model, info.preprocessing, [size], sample_paths(train_paths, seed=cfg.seed),
                          batch_size=cfg.ft_batch_size, trainable=_trainable(model, info, cfg.frozen_stride),
                          mixed_precision=cfg.mixed_precision, workers=_workers(cfg), train=True)
    fit = epochs_fit(whole, size, budget_s=cfg.time_limit, elapsed_s=time.time() - started_at,
                           **{k: parts[k] for k in ("n_extract", "n_train", "n_val", "n_test", "head_s")})
    fits = fit >= CACHED_EPOCHS
    record = {"whole": fits, "epochs_fit": round(fit, 1), "wanted": CACHED_EPOCHS, "size": size,
              "line": f"whole network: {fit:.1f} of its epochs fit at {size}px, {CACHED_EPOCHS} wanted: "
                      + ("it fine-tunes end to end (recipe), not the top stages on cached activations" if fits
                         else "the top stages fine-tune on cached activations")}
    if fits:
        plan = make_plan(default_size=size, costs=whole, elapsed_s=time.time() - started_at, image_size=size,
                         **parts)
        plan = replace(plan, reasons=[*top.reasons, *(r for r in plan.reasons if not r.endswith("(--image-size)"))])
    return replace(plan, decisions={**plan.decisions, "whole_network": record})


def head_seconds(n_train: int) -> float:
    """Rough seconds for the probe head on cached features: its C search runs on at most 10,000 images
    and its refit on all of them. It is low for large sets; the plan made again before fine-tuning uses
    the time actually spent."""
    return 5.0 + 1e-3 * n_train


def plan_finetune(plan: Plan, ds: Dataset, cfg: Any, model: Classifier, info: BackboneInfo, stats: Any,
                  started_at: float, cached: bool = False) -> Plan:
    """The plan again before fine-tuning, on costs measured at the chosen size (a few training steps,
    and the extraction just done: ``stats``, the head stage's :class:`~transferlab.stages.HeadStats`) and
    with the time actually left."""
    n = ds.split_sizes()
    cached = cached and trains_cached(model, cfg.accelerator)
    train_paths = [s.path for s in ds.samples if s.split == "train"]
    costs = measure_costs(model, info.preprocessing, [plan.image_size], sample_paths(train_paths, seed=cfg.seed),
                          batch_size=cfg.ft_batch_size, trainable=_trainable(model, info, cfg.frozen_stride, cached),
                          mixed_precision=cfg.mixed_precision, workers=_workers(cfg), train=True)
    if stats.features_computed >= 256 and stats.extract_s > 0:  # measured on the real files
        costs.eval_s[plan.image_size] = stats.extract_s / stats.features_computed
    again = make_plan(native=plan.native_size, default_size=plan.image_size, n_extract=0, n_train=n["train"],
                      n_val=n["val"], n_test=n["test"], costs=costs, finetune=True, budget_s=cfg.time_limit,
                      elapsed_s=time.time() - started_at, max_epochs=cfg.ft_epochs, image_size=plan.image_size,
                      head_s=0.0, cached=cached)
    reasons = [r if r.startswith("before ") else f"before extraction: {r}" for r in plan.reasons]
    reasons += [f"before fine-tuning: {r}" for r in again.reasons if not r.endswith("(--image-size)")]
    return replace(again, reasons=reasons, task=plan.task, decisions=plan.decisions)


def _workers(cfg: Any) -> int:
    return default_workers() if cfg.workers is None else cfg.workers
