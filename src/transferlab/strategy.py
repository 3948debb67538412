"""The training strategy: which recipes to try on this data, the race between them, and the survivor's run.

A practitioner with fifteen minutes tries the few things that usually work, looks at validation early,
drops what does not pay and spends the rest on the winner. :func:`~transferlab.decisions.portfolio`
proposes the candidates (recipes of :mod:`transferlab.training.recipes`) from the data's resolution and
size and the backbone; :func:`run_strategy` races them with successive halving
(:mod:`transferlab.training.race`) and trains the survivor with the rest of the budget. With a time limit
the survivor's one-cycle schedule fills the budget and runs to its end, keeping its final weights; without
one, early stopping on validation ends it and its best validated weights are kept. A fine-tuning that
never beats the head it started from leaves the head in place. Why these defaults: BENCHMARKS.md, "The
race of training recipes".
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .backbones.models import BackboneInfo, Classifier, build_head, create_backbone
from .events import emit
from .training.callbacks import History
from .training.cached import fit_cached, trains_cached
from .training.finetune import FinetuneConfig, FinetuneResult, fit_finetune, precision_for
from .training.plan import Plan, measure_costs, sample_paths
from .training.race import RACE_SHARE, Race, RungResult, rung_sizes, slice_seconds, successive_halving
from .training.recipes import Recipe

__all__ = ["run_strategy", "fit_recipe", "with_race_estimate", "StrategyOutcome", "budget_record", "decision_record"]

log = logging.getLogger("transferlab")

#: The survivor's schedule with a time limit fills the time left, up to this many epochs ...
MAX_SURVIVOR_EPOCHS = 40
#: ... or this share of it (the rest absorbs estimation error; the deadline cuts a schedule that overruns).
SURVIVOR_FILL = 0.9
#: Seconds a rung spends starting (the Trainer, the loaders' workers, the first batches), beyond its steps.
RUNG_START_S = 10.0


@dataclass
class StrategyOutcome:
    """The survivor's fine-tuning, its network's backbone description and the race's record."""

    ft: FinetuneResult
    info: BackboneInfo
    record: dict[str, Any]


@dataclass
class _Context:
    model: Classifier  # the run's backbone with its head (trained, or new when the head phase was skipped)
    info: BackboneInfo
    base: FinetuneConfig  # the run's fine-tuning options (plan, deadline, class weights, ...)
    plan: Plan
    native: int | None
    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]]
    run: Path
    n_classes: int
    head_trained: bool
    epoch_s: dict[str, float] = field(default_factory=dict)


def _epoch_seconds(c: Recipe, ctx: _Context) -> float:
    """Estimated seconds of one training epoch of ``c`` (with its validation): the plan's for the run's
    network; measured on a recipe's own network at its size, in its precision."""
    if c.backbone is None:
        return ctx.plan.estimate.get("finetune_epoch", 0.0)
    if c.name not in ctx.epoch_s:
        model, info, cfg, _ = _start(c, ctx, ctx.base)
        precision = precision_for(cfg.accelerator, cfg.mixed_precision, cfg.cpu_bf16)  # the fit's own
        costs = measure_costs(model, info.preprocessing, [info.preprocessing.size],
                              sample_paths(ctx.train[0], seed=cfg.seed), batch_size=cfg.batch_size,
                              workers=cfg.workers, train_bf16=precision != "32-true")
        size = info.preprocessing.size
        ctx.epoch_s[c.name] = len(ctx.train[0]) * costs.train_at(size) + len(ctx.val[0]) * costs.eval_at(size)
    return ctx.epoch_s[c.name]


def _start(c: Recipe, ctx: _Context, base: FinetuneConfig) -> tuple[Classifier, BackboneInfo, FinetuneConfig,
                                                                     bool]:
    """A fresh copy of the recipe's starting network, its options (``base`` with what the recipe changes)
    and whether it is pretrained. A recipe with a network of its own trains it from scratch at the images'
    own size; one that does not start from a trained head trains a new one from the first step."""
    if c.backbone is not None:
        backbone, info = create_backbone(c.backbone, pretrained=False, image_size=max(16, int(ctx.native or 32)))
        model, pretrained = Classifier(backbone, build_head(info.num_features, ctx.n_classes), info.preprocessing), False
    else:
        model, info, pretrained = copy.deepcopy(ctx.model), ctx.info, ctx.info.pretrained
    cfg = base
    if not (c.from_head and ctx.head_trained) or c.backbone is not None:
        cfg = replace(cfg, freeze_epochs=0, head_lr=2 * base.lr, initial_val_loss=None)
    return model, info, replace(cfg, **c.options), pretrained


def _fit(c: Recipe, ctx: _Context, base: FinetuneConfig, run_dir: Path, history: History,
         resume: bool = False) -> tuple[FinetuneResult, BackboneInfo]:
    model, info, cfg, pretrained = _start(c, ctx, base)
    return fit_recipe(model, ctx.train, ctx.val, cfg, run_dir, history, resume=resume, pretrained=pretrained), info


def fit_recipe(model: Classifier, train: tuple[list[str], list[Any]], val: tuple[list[str], list[Any]],
               cfg: FinetuneConfig, run_dir: Path, history: History, *, resume: bool = False,
               pretrained: bool = True) -> FinetuneResult:
    """Fine-tune as ``cfg`` says: on cached activations (``cfg.cached``) where the network can be cut there
    and one CPU process trains one label per image, else end to end from the files (on a GPU the whole
    network's epochs are cheap, and the Trainer drives it). A resumed fit on cached activations starts again
    from the head (it keeps no checkpoint: its activations are gone with the process)."""
    if cfg.cached and pretrained and not cfg.multilabel and trains_cached(model, cfg.accelerator) \
            and cfg.devices in (1, "1", "auto") and cfg.num_nodes == 1:
        return fit_cached(model, *train, *val, cfg, run_dir, history)
    return fit_finetune(model, *train, *val, cfg, run_dir, history, resume=resume, pretrained=pretrained)


def _rung(c: Recipe, ctx: _Context, seconds: float, rung: int) -> RungResult:
    """One slice of ``seconds`` for ``c``: a short one-cycle schedule planned for the slice, validated at
    least twice; with a time limit a deadline ends it at the slice's end, without one its epochs do (never
    more than the run's planned epochs). Its checkpoints are removed afterwards."""
    epoch_s = _epoch_seconds(c, ctx)
    epochs = max(0.1, math.floor(10 * seconds / max(epoch_s, 1e-6)) / 10)
    if not ctx.base.deadline:  # without a limit a rung is never longer than the survivor's schedule
        epochs = min(ctx.plan.epochs, epochs)
    # two validation passes inside a short slice (its middle and its end), one an epoch in a long one: a pass
    # costs as much as a good share of a short slice's training (digits at 224 px: 3 passes took half a rung)
    val_every = epochs / 2 if epochs < 2 else 1.0
    deadline = min(time.time() + seconds, ctx.base.deadline) if ctx.base.deadline else None
    cfg = replace(ctx.base, epochs=epochs, deadline=deadline, val_every=val_every, discard_after_s=None,
                  patience=None, reserve_s=0.0, initial_val_loss=None, quiet=True)
    folder = ctx.run / "race" / f"{c.name}-rung{rung + 1}"
    emit("race", candidate=c.name, rung=rung + 1, slice_s=round(seconds, 1), state="start")
    t0 = time.perf_counter()
    ft, _ = _fit(c, ctx, cfg, folder, History(None, f"race {c.name}"))
    took = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    vals = [v for v in ft.validations if v.get("val_acc") is not None]
    best = max(vals, key=lambda v: (v["val_acc"], -v.get("val_cal_loss", 0.0)), default=None)
    done = max([v.get("epoch") or 0.0 for v in vals], default=0.0)
    res = RungResult(float(best["val_acc"]) if best else -1.0,
                     float(best.get("val_cal_loss", math.nan)) if best else math.nan, took,
                     [{k: v.get(k) for k in ("seconds", "epoch", "val_acc", "val_cal_loss")} for v in vals],
                     epochs=float(done))
    emit("race", candidate=c.name, rung=rung + 1, seconds=round(took, 1), val_acc=res.val_acc, state="done")
    return res


def _survivor_epochs(ctx: _Context, race: Race, epoch_s: float) -> tuple[float, str]:
    """The survivor's schedule: with a deadline, the epochs that fill the time left, at the seconds per
    epoch its rungs measured (between two rungs of different lengths, so that the fixed cost of starting a
    fit counts once), else the run's planned epochs; early stopping ends it sooner once it converges."""
    if race.winner is not None and race.winner.options.get("cached"):
        return ctx.plan.epochs, "its views cached, then as many epochs of the top stages as the time left holds" \
            if ctx.base.deadline else "its views cached, then a fixed schedule of the top stages"
    if not ctx.base.deadline:
        return ctx.plan.epochs, f"{ctx.plan.epochs:g} epochs, stopped only by early stopping on validation"
    runs = [(r["seconds"], r["epochs"]) for rung in race.rungs for r in rung
            if r["candidate"] == race.winner.name and r["epochs"]]
    fixed = 0.0
    if len(runs) >= 2 and runs[-1][1] > runs[-2][1] and runs[-1][0] > runs[-2][0]:
        (t1, e1), (t2, e2) = runs[-2], runs[-1]
        epoch_s = (t2 - t1) / (e2 - e1)
        fixed = max(0.0, t2 - e2 * epoch_s)
    elif runs:
        epoch_s = runs[-1][0] / runs[-1][1]
    left = ctx.base.deadline - time.time() - ctx.base.reserve_s
    epochs = math.floor(10 * SURVIVOR_FILL * max(0.0, left - fixed) / max(epoch_s, 1e-6)) / 10
    epochs = float(min(MAX_SURVIVOR_EPOCHS, max(0.1, epochs)))
    return epochs, f"{epochs:g} epochs to fill the {left:.0f}s left (about {epoch_s:.0f}s an epoch, {fixed:.0f}s to start)"


def with_race_estimate(plan: Plan, candidates: Sequence[Recipe]) -> Plan:
    """The plan with the race's seconds in its estimate and a line saying what races (a limit bounds the
    race and the survivor together; without one the race adds its share of the fine-tuning estimate)."""
    names = " against ".join(c.name for c in candidates)
    if len(candidates) < 2:
        return plan
    est = dict(plan.estimate)
    if plan.budget_s is None:
        rungs = sum(rung_sizes(len(candidates)))
        est["race"] = RACE_SHARE * est.get("finetune", 0.0) + rungs * RUNG_START_S
        est["total"] = est.get("total", 0.0) + est["race"]
    line = (f"race: {names} on validation, {RACE_SHARE:.0%} of the fine-tuning time in rungs of successive "
            "halving; the survivor gets the rest")
    return replace(plan, estimate=est, reasons=[*plan.reasons, line])


def run_strategy(candidates: Sequence[Recipe], model: Classifier, info: BackboneInfo, base: FinetuneConfig,
                 plan: Plan, *, native: int | None, train: tuple[list[str], list[int]],
                 val: tuple[list[str], list[int]], run: Path, history: History, n_classes: int,
                 head_trained: bool, resume: bool = False, winner: str | None = None,
                 decided: Callable[[dict[str, Any]], None] = lambda record: None) -> StrategyOutcome:
    """Race ``candidates`` on validation and train the survivor with the rest of the budget.

    ``base``: the run's fine-tuning options (its deadline bounds the race and the survivor; without one
    the race shares :data:`~transferlab.training.race.RACE_SHARE` of the plan's fine-tuning estimate).
    ``model``: the run's network with its head, ``head_trained`` when the head phase ran. ``resume``
    continues the survivor ``winner`` of an interrupted run without racing again. ``decided`` is
    given the race's record before the survivor trains (the pipeline keeps it in ``plan.json``).
    """
    ctx = _Context(model, info, base, plan, native, train, val, run, n_classes, head_trained)
    if resume or not val[0]:
        first = next((c for c in candidates if c.name == winner), candidates[0])
        race = successive_halving([first], 0.0, lambda *_: RungResult(math.nan, math.nan, 0.0))
        race.reason = "resumed: the interrupted run's survivor continues" if resume else \
            "no validation images to race on: the first candidate runs"
    else:
        # without a limit, the slice is a share of the planned epochs (at the plan's seconds per epoch), so a
        # race of fine-tuning recipes trains the same epochs on any machine
        budget = (base.deadline - time.time() - base.reserve_s) if base.deadline else \
            plan.epochs * plan.estimate.get("finetune_epoch", 0.0)
        race = successive_halving(candidates, slice_seconds(len(candidates), budget),
                                  lambda c, s, r: _rung(c, ctx, s, r), announce=_announce,
                                  horizon_s=(1 - RACE_SHARE) * budget)
    assert race.winner is not None
    shutil.rmtree(run / "race", ignore_errors=True)  # the rungs' checkpoints
    if not race.rungs:
        _announce(f"race: none ({race.reason})")
    decided(race.to_dict())
    epochs, why = _survivor_epochs(ctx, race, _epoch_seconds(race.winner, ctx))
    _announce(f"{race.winner.name}: {why}")
    # a loser is replaced, never an early exit; with a limit the schedule fills the budget, runs to its end
    # and keeps its final weights (a scratch CNN's 40-epoch schedule was early-stopped at 90% of its peak rate
    # on a noisy validation loss; fm100's best validation, at 4 of 16 epochs, lost 2 points of test accuracy
    # to its final weights). Without one, early stopping (from the peak) is the only stop, and keeps the best.
    cfg = replace(base, epochs=epochs, discard_after_s=None, patience=None if base.deadline else base.patience,
                  keep_final=bool(base.deadline))
    history.phase = "finetune"
    t0 = time.perf_counter()
    ft, winner_info = _fit(race.winner, ctx, cfg, run, history, resume=resume)
    record = race.to_dict()
    record["survivor"] = {"name": race.winner.name, "epochs_planned": epochs,
                          "seconds": round(time.perf_counter() - t0, 1), **ft.to_record(), "why": why}
    emit("race", candidate=race.winner.name, state="survivor done", kept=ft.improved)
    return StrategyOutcome(ft, winner_info, record)


def budget_record(limit_s: float | None, total_s: float, ft: FinetuneResult | None,
                  patience: float = 3.0) -> dict[str, Any]:
    """The time limit, the seconds used and unused, and why the run ended where it did. The fit's validations
    are judged among themselves, not against the model it started from: it converged when its schedule
    ended ``patience`` epochs or more after its own best validation (early stopping's own test), and it was
    still improving when its last validation was its best (lowest loss or highest accuracy so far)."""
    still, improving = _trend(ft.validations, ft.epochs_run) if ft is not None else (0.0, False)
    shortened = f"shortened to {ft.shortened_to:g} epochs to anneal before the limit" if ft and ft.shortened_to else ""
    rising = ("still improving when the time ran out (its last validation was its best): a longer --time-limit "
              "would likely pay")
    if ft is None:
        why = "no fine-tuning in this run"
    elif ft.stopped_by_time:
        why = "the time limit stopped the survivor" + (f", {rising}" if improving else "")
    elif ft.stopped_early:
        why = "the survivor converged (early stopping on validation)"
    elif ft.stopped_unpaid:
        why = "fine-tuning was stopped unpaid (--recipe single's rule)"
    elif still >= patience:
        why = (f"the survivor had converged: its schedule ended {still:g} epochs after its best validation"
               + (f" ({shortened})" if shortened else ""))
    elif improving and limit_s:
        why = f"the survivor was {rising}" + (f" ({shortened})" if shortened else "")
    elif shortened:
        why = f"the survivor's schedule ended, {shortened}"
    else:
        why = "the survivor's planned epochs ended before the limit"
    return {"limit_s": limit_s, "used_s": round(total_s, 1),
            "unused_s": round(max(0.0, limit_s - total_s), 1) if limit_s else None, "why": why,
            "epochs_without_gain": round(still, 2), "still_improving": improving}


def _trend(validations: Sequence[dict[str, Any]], epochs_run: int) -> tuple[float, bool]:
    """Epochs from the fit's own best validation (the last pass whose loss was the lowest so far, or whose
    accuracy the highest) to the end of the fit, and whether that best was the last pass."""
    best_at, low, high = None, float("inf"), float("-inf")
    for k, v in enumerate(validations):
        loss, acc = v.get("val_loss", v.get("train_loss")), v.get("val_acc")
        gained = (loss is not None and loss < low) or (acc is not None and acc > high)
        low, high = min(low, loss if loss is not None else low), max(high, acc if acc is not None else high)
        if gained:
            best_at = k
    if best_at is None:
        return float(epochs_run), False
    epoch = validations[best_at].get("epoch") or 0.0
    return max(0.0, float(epochs_run) - float(epoch)), best_at == len(validations) - 1


def decision_record(race: dict[str, Any] | None) -> dict[str, Any] | None:
    """What chose this network (``config.json``): the race's winner, the reason and every candidate's fate."""
    if not race:
        return None
    return {"strategy": "race", "winner": race["winner"], "reason": race["reason"],
            "candidates": {c["name"]: c["status"] for c in race["candidates"]}}


def _announce(line: str) -> None:
    log.info(line)
    emit("race_line", line=line)
