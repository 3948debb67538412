"""The Lightning module: model code only (steps, loss, optimiser, schedule); engineering lives in the
Trainer and callbacks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from ..probability import calibrated_nll, multilabel_nll

__all__ = ["ClassifierModule", "WarmupCosine", "cosine_with_warmup"]


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor``, over ``total_steps``.

    A callable object rather than a closure, so the schedule can be resized while it runs (:meth:`resize`)
    and LambdaLR's checkpoint keeps its length (it saves a callable object's attributes). It never grows
    past the length it was planned with (``planned_steps``).
    """

    def __init__(self, total_steps: int, warmup_steps: int, floor: float = 0.01) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(max(0, warmup_steps), self.total_steps - 1) if self.total_steps > 1 else 0
        self.floor = floor
        self.planned_steps, self.planned_warmup = self.total_steps, self.warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def resize(self, total_steps: int, step: int) -> None:
        """End the schedule at ``total_steps`` instead (at most its planned length), from training step
        ``step``: a warm-up still under way keeps its planned share of the new length; once past it the
        cosine spans the new length (a longer one decays more slowly from here on)."""
        # (a checkpoint from before planned_steps existed leaves the fresh schedule's, from this run's plan:
        # LambdaLR's load_state_dict updates the callable's attributes, it does not replace them)
        total_steps = max(step + 1, min(total_steps, self.planned_steps))
        if step < self.warmup_steps:
            warmup = self.planned_warmup * total_steps / self.planned_steps
            self.warmup_steps = max(step, min(round(warmup), total_steps - 1))
        self.total_steps = total_steps


def cosine_with_warmup(total_steps: int, warmup_steps: int, floor: float = 0.01) -> WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor`` (:class:`WarmupCosine`)."""
    return WarmupCosine(total_steps, warmup_steps, floor)


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``model`` (a head on features, or a whole classifier); with
    ``multilabel``, binary cross-entropy on sigmoid outputs against a 0/1 label matrix.

    Args:
        model: maps a batch to logits.
        param_groups: optimiser groups ``[{"params": [...], "lr": ...}]``; default one group at ``lr``.
        lr: base learning rate. weight_decay: AdamW decay. label_smoothing: cross-entropy smoothing.
        class_weights: per-class loss weights (``None``: unweighted); multi-label: each label's positive weight.
        warmup: share of the training steps spent in linear warm-up before the cosine decay.
        input_transform: applied to inputs on the device before ``model`` (e.g. channels_last).
        mix: maps a training batch ``(x, y)`` to mixed inputs and soft targets (timm's ``Mixup``, which applies
            the label smoothing itself); ``None``: plain batches. A batch of odd size trains unmixed.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 1e-4,
                 label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                 warmup: float = 0.0, param_groups: list[dict[str, Any]] | None = None,
                 input_transform: Any = None, multilabel: bool = False,
                 mix: Any = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.warmup = warmup
        self.param_groups = param_groups
        self.input_transform = input_transform
        self.multilabel = multilabel
        self.mix = mix
        w = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", w, persistent=False)
        self._val_out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return self.model(x)

    def _step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[-1]
        mixed = stage == "train" and self.mix is not None and x.shape[0] % 2 == 0
        if mixed:  # soft targets, smoothed by the mixer; accuracy against each image's own label
            x, soft = self.mix(x.float(), y)
        logits = self(x).float()
        if self.multilabel:  # accuracy: the share of label decisions right at 0.5
            loss = F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=self.class_weights)
            acc = ((logits > 0) == (y > 0)).float().mean()
        elif mixed:
            loss = F.cross_entropy(logits, soft, weight=self.class_weights)
            acc = (logits.argmax(1) == y).float().mean()
        else:
            loss = F.cross_entropy(logits, y, weight=self.class_weights,
                                   label_smoothing=self.label_smoothing if stage == "train" else 0.0)
            acc = (logits.argmax(1) == y).float().mean()
        n = y.shape[0]
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True,
                 prog_bar=stage == "val")
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, batch_size=n, sync_dist=True,
                 prog_bar=stage == "val")
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_idx: int) -> None:
        _, logits = self._step(batch, "val")
        probs = torch.sigmoid(logits.detach()) if self.multilabel else torch.softmax(logits.detach(), 1)
        self._val_out.append((probs.cpu(), batch[-1].cpu()))

    def on_validation_epoch_start(self) -> None:
        self._val_out = []

    def on_validation_epoch_end(self) -> None:
        """Logs ``val_cal_loss``: the validation NLL after temperature scaling (what model selection uses);
        multi-label: the mean binary cross-entropy (thresholds, not a temperature, calibrate decisions)."""
        if not self._val_out:
            return
        probs = torch.cat([p for p, _ in self._val_out])
        y = torch.cat([t for _, t in self._val_out])
        self._val_out = []
        if self.trainer.world_size > 1:  # every rank scores the whole validation set
            probs = self.all_gather(probs).reshape(-1, probs.shape[-1]).cpu()
            y = self.all_gather(y).reshape(-1, *y.shape[1:]).cpu()
        value = multilabel_nll(probs.double().numpy(), y.numpy()) if self.multilabel else \
            calibrated_nll(probs.double().numpy(), y.numpy())
        self.log("val_cal_loss", value, on_step=False, on_epoch=True, prog_bar=False, sync_dist=False)

    def configure_optimizers(self):
        groups = self.param_groups or [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(self.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
