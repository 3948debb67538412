"""Callbacks with state: epoch history, best weights in memory, the must-pay rule, early stopping in the
schedule's annealing, stage unfreezing, the deadline and the schedule fitted to it."""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from .._io import write_text
from ..events import emit

__all__ = ["History", "BestWeights", "MustPay", "AnnealingStop", "StageUnfreeze", "Deadline", "AnnealByDeadline",
           "HISTORY_FIELDS"]

HISTORY_FIELDS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class History(L.Callback):
    """Collects one row per epoch (losses, accuracies, learning rate) and writes ``history.csv``.

    ``phase`` names the training stage (``head`` or ``finetune``) so one file holds a whole run.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, phase: str = "head",
                 rows: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path) if path else None
        self.phase = phase
        self.rows: list[dict[str, Any]] = rows if rows is not None else []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        emit("step", every_s=0.5, phase=self.phase, epoch=trainer.current_epoch + 1, batch=batch_idx + 1,
             batches=trainer.num_training_batches, global_step=trainer.global_step,
             max_steps=trainer.estimated_stepping_batches)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        m = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": len([r for r in self.rows if r["phase"] == self.phase]) + 1,
                               "phase": self.phase}
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            row[key] = float(m[key]) if key in m else math.nan
        opt = trainer.optimizers[0] if trainer.optimizers else None
        row["lr"] = float(opt.param_groups[-1]["lr"]) if opt else math.nan
        row["seconds"] = round(time.perf_counter() - self._t0, 3)
        if trainer.is_global_zero:
            self.rows.append(row)
            self.write()

    def write(self) -> None:
        """Write the rows collected so far (atomically); they are an event for a watcher too."""
        emit("history", rows=[{k: None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k)
                               for k in HISTORY_FIELDS} for r in self.rows])
        if self.path is None:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: r.get(k, "") for k in HISTORY_FIELDS})
        write_text(self.path, buf.getvalue())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows[:] = list(state_dict.get("rows", []))


class BestWeights(L.Callback):
    """Keeps a copy of the module's weights at the best ``monitor`` value; restores them at the end.

    ``validations`` records every validation pass: training step, epochs done, seconds since the fit
    started, the monitored value, validation accuracy and whether it was the best so far. With
    ``averaging`` (Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`, which validates
    the averaged weights), the averaged weights are the ones kept.

    With ``keep_final``, a fit that ran its schedule to the end (no callback stopped it) and beat its
    starting point at least once keeps the weights it ended with instead (``kept`` says which): the
    annealed end of a one-cycle schedule is the point it was designed for, and a validation split of a few
    hundred images cannot rank the checkpoints of one schedule (BENCHMARKS.md, "Figures behind the
    defaults").
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", averaging: Any = None,
                 keep_final: bool = False) -> None:
        self.monitor, self.mode = monitor, mode
        self.averaging = averaging
        self.keep_final = keep_final
        self.kept = "best"  # which weights the fit ended with: "best" validated or "final"
        self.best: float | None = None
        self.best_epoch: int = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.validations: list[dict[str, Any]] = []
        self.unkept: dict[str, torch.Tensor] | None = None  # the weights a fit that never beat its start ended with
        self._t0 = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @property
    def improved(self) -> bool:
        """Whether any validation pass beat the starting point."""
        return self.best_epoch >= 0

    def _better(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self._better(value)
        batches = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 0
        acc = trainer.callback_metrics.get("val_acc")
        self.validations.append({"step": int(trainer.global_step),
                                 "epoch": round(trainer.global_step / batches, 3) if batches else None,
                                 "seconds": round(time.perf_counter() - self._t0, 2), self.monitor: value,
                                 "val_acc": float(acc) if acc is not None else None, "best": better})
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch
            averaged = getattr(self.averaging, "_average_model", None)  # Lightning keeps it private
            source = averaged.module if averaged is not None else pl_module
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in source.state_dict().items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.improved and self.state is not None:  # the fit's own weights, before the start is restored
            averaged = getattr(self.averaging, "_average_model", None)
            source = averaged.module if averaged is not None else pl_module
            self.unkept = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
        if self.keep_final and self.improved and not trainer.should_stop:
            averaged = getattr(self.averaging, "_average_model", None)
            if averaged is not None:
                pl_module.load_state_dict(averaged.module.state_dict())
            self.kept = "final"
        elif self.state is not None:
            pl_module.load_state_dict(self.state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch", -1)
        self.state = state_dict.get("state")


class MustPay(L.Callback):
    """Stops a fine-tuning that has not beaten its starting point (``best.improved`` is False) before
    ``limit_s`` seconds of it are spent: at each validation pass, if the next stretch of training
    would end past the limit. So a fine-tuning whose result would be thrown away costs at most
    ``limit_s`` (the pipeline gives a third of the budget). The decision is shared by every process.
    """

    def __init__(self, best: BestWeights, limit_s: float) -> None:
        self.best, self.limit_s = best, limit_s
        self.triggered = False
        self._t0 = self._last = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        stretch, self._last = now - self._last, now
        stop = not self.best.improved and (now - self._t0) + stretch > self.limit_s
        stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True
            self.triggered = True


class AnnealingStop(EarlyStopping):
    """Early stopping that counts only once the one-cycle schedule's rate is falling: from the end of the
    run's :class:`~transferlab.training.module.WarmupCosine` warm-up (as it stands, shortened or not).

    While the rate warms up, validation loss rising is the schedule working, not the model converging, so
    validations before the peak neither count against the patience nor set the best it is measured from.
    ``patience=None`` never runs out: the fit then stops only on a non-finite loss (Lightning's check).
    """

    def __init__(self, monitor: str, *, patience: int | None) -> None:
        super().__init__(monitor, patience=math.inf if patience is None else patience, mode="min")  # type: ignore[arg-type]

    @staticmethod
    def _warming_up(trainer: L.Trainer) -> bool:
        schedule = _schedule(trainer)
        return schedule is not None and trainer.global_step < schedule.warmup_steps

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._warming_up(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._warming_up(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    @property
    def stopped(self) -> bool:
        """Whether it ended the fit (patience ran out)."""
        return self.wait_count >= self.patience


class StageUnfreeze(L.Callback):
    """Backbone frozen for ``freeze_epochs``, then the top ``unfreeze`` stages (or all) train; the first
    ``always_frozen`` stages never do.

    BatchNorm layers of frozen stages stay in eval mode, so their running statistics do not drift.
    With ``train_bn=False`` (the default for pretrained backbones, as the Keras guide advises) every
    BatchNorm keeps its ImageNet statistics while its affine weights still train: small batches of
    images unlike ImageNet would otherwise replace those statistics and undo what the head learned.
    """

    def __init__(self, stages: list[list[nn.Parameter]], bns: list[list[nn.Module]], freeze_epochs: int,
                 unfreeze: str | int, train_bn: bool = False, always_frozen: int = 0) -> None:
        self.stages, self.bns = stages, bns
        self.train_bn = train_bn
        self.freeze_epochs = freeze_epochs
        self.always_frozen = always_frozen
        n = len(stages)
        self.n_unfreeze = n if unfreeze == "all" else max(0, min(n, int(unfreeze)))

    def trainable_stages(self, epoch: int) -> set[int]:
        """Stage indices that train in ``epoch`` (0-based)."""
        if epoch < self.freeze_epochs:
            return set()
        n = len(self.stages)
        return set(range(max(n - self.n_unfreeze, self.always_frozen), n))

    def _apply(self, epoch: int) -> None:
        live = self.trainable_stages(epoch)
        for i, stage in enumerate(self.stages):
            for p in stage:
                p.requires_grad_(i in live)
                if i not in live:
                    p.grad = None
            for bn in self.bns[i]:
                bn.train(i in live and self.train_bn)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._apply(trainer.current_epoch)


class Deadline(L.Callback):
    """Stops training so that evaluation and saving still fit before ``deadline`` (``time.time()``).

    ``reserve_s`` grows to the measured length of a validation pass times ``eval_factor`` (evaluating
    val and test afterwards costs about that), plus a fixed margin. ``clock`` gives the time compared
    with ``deadline`` (``time.time``; a test may make time pass faster).
    """

    clock = staticmethod(time.time)

    def __init__(self, deadline: float, eval_factor: float = 2.0, margin_s: float = 5.0) -> None:
        self.deadline, self.eval_factor, self.margin_s = deadline, eval_factor, margin_s
        self.val_s = 0.0
        self._t = 0.0
        self.step_s = 0.0
        self.triggered = False

    def seconds_left(self, extra: float = 0.0) -> float:
        """Seconds of training left before the deadline, once its reserve (and ``extra``) is kept."""
        return self.deadline - self.clock() - (self.margin_s + self.eval_factor * self.val_s + extra)

    def _check(self, trainer: L.Trainer, extra: float = 0.0) -> None:
        stop = self.seconds_left(extra) <= 0
        if trainer.world_size > 1:  # every rank follows rank 0's clock (as Lightning's Timer): none waits alone
            stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            trainer.should_stop = True
            self.triggered = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_s = time.perf_counter() - self._t
        # a stop requested mid-epoch skips the epoch's validation, so reserve one step, not a val pass
        self._check(trainer, extra=self.step_s)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_s = time.perf_counter() - self._t
        self._check(trainer, extra=self.val_s)


class AnnealByDeadline(L.Callback):
    """Fits the one-cycle schedule, at the end of each epoch, to the training that still fits before the
    :class:`Deadline` stops it, so the rate has decayed when it does.

    The schedule's length comes from the plan's estimate of an epoch, made on a few batches before training;
    real epochs can run longer, and a deadline that cuts a schedule three quarters of the way leaves the
    weights at a third of the peak rate. The pace is the median epoch so far (validation included), the
    first left out once there are others (it carries the loaders' start). A shortened schedule ends on the
    whole epochs that fit and then the share of one more that fits with its validation pass (a fit stopped
    mid-epoch validates there), so the time a whole epoch would not fill is not left unused. A schedule
    shortened on a slow epoch grows back (never past its planned length) when the pace allows it with half
    an epoch to spare. Every process follows rank 0's decision.
    """

    #: A last share of an epoch shorter than this is not trained (its steps would barely move the weights).
    MIN_SHARE = 0.1
    #: The share of an epoch left in hand when sizing the last, partial one (its pace is an estimate).
    SAFETY = 0.9

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self._t = 0.0
        self._epoch_s: list[float] = []
        self._planned: tuple[int, int] = (0, -1)  # the fit's max_epochs and max_steps as planned
        self._stop_step: int | None = None  # the schedule ends inside an epoch: the fit stops at this step
        self.shortened_to: float | None = None  # the epochs the schedule is shortened to (None: as planned)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._planned = (trainer.max_epochs or 0, trainer.fit_loop.epoch_loop.max_steps)
        # a resumed run's schedule comes back shortened from its checkpoint: its epochs end with it
        schedule = _schedule(trainer)
        batches = max(1, trainer.num_training_batches)
        if schedule is not None and trainer.max_epochs and schedule.total_steps < schedule.planned_steps:
            epochs = math.ceil(schedule.total_steps / batches)
            if epochs < trainer.max_epochs:
                _end_at(trainer, epochs)
            self._stop_step = schedule.total_steps if schedule.total_steps % batches else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t = self.deadline.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop_step is not None and trainer.global_step >= self._stop_step:
            trainer.should_stop = True  # the schedule's last step: validate here and end

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_s.append(self.deadline.clock() - self._t)
        pace = max(statistics.median(self._epoch_s[1:] or self._epoch_s), 1e-9)
        batches = max(1, trainer.num_training_batches)
        schedule = _schedule(trainer)
        if schedule is None or not self._planned[0]:
            return
        done, now, planned = trainer.current_epoch + 1, schedule.total_steps, schedule.planned_steps
        fit = self.deadline.seconds_left() / pace  # epochs that fit, at the pace so far
        if (done + fit) * batches < now:
            whole = math.floor(fit)
            # the rest of the time holds this share of one more epoch's training, after its validation
            train_s = max(pace - self.deadline.val_s, 0.1 * pace)
            share = (fit - whole) * pace * self.SAFETY
            share = max(0.0, (share - self.deadline.val_s) / train_s)
            steps = (done + whole) * batches + (math.floor(share * batches) if share >= self.MIN_SHARE else 0)
        else:  # it fits: it grows only with half an epoch to spare, never past the plan
            steps = min(max(now, (done + math.floor(fit - 0.5)) * batches), planned)
        if trainer.world_size > 1:
            steps = int(trainer.strategy.broadcast(steps, src=0))
        if steps == now or steps <= trainer.global_step:
            return  # as it stands, or nothing is left for the rate to decay over (the deadline stops it)
        if steps >= planned:  # back to the plan: its steps and its own end
            schedule.resize(planned, trainer.global_step)
            trainer.fit_loop.max_epochs, trainer.fit_loop.epoch_loop.max_steps = self._planned
            self._stop_step, self.shortened_to = None, None
        else:
            schedule.resize(steps, trainer.global_step)
            _end_at(trainer, math.ceil(steps / batches))
            self._stop_step = steps if steps % batches else None
            self.shortened_to = round(steps / batches, 2)


def _end_at(trainer: L.Trainer, epochs: int) -> None:
    """The fit ends after ``epochs`` whole epochs (and no step limit ends it sooner)."""
    trainer.fit_loop.max_epochs, trainer.fit_loop.epoch_loop.max_steps = epochs, -1


def _schedule(trainer: L.Trainer) -> Any:
    """The run's resizable learning-rate schedule (a :class:`~transferlab.training.module.WarmupCosine`
    inside LambdaLR), if it has one."""
    for config in trainer.lr_scheduler_configs:
        for f in getattr(config.scheduler, "lr_lambdas", []):
            if hasattr(f, "resize"):
                return f
    return None
