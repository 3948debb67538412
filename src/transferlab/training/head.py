"""Training a head on cached features (``--mode head``): seconds on a CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..backbones.models import build_head
from .callbacks import BestWeights, History
from .module import ClassifierModule
from .trainer import make_trainer

__all__ = ["HeadConfig", "fit_head", "balanced_class_weights"]


@dataclass
class HeadConfig:
    """How the head is trained. Defaults follow the Keras transfer-learning guide (Adam-type optimiser
    at 1e-3 on frozen features) with early stopping on the validation loss.

    hidden: MLP widths (empty: linear head). dropout: after each hidden layer (and before a linear head).
    epochs: at most. patience: epochs without val-loss improvement before stopping.
    """

    hidden: Sequence[int] = ()
    dropout: float = 0.0
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    label_smoothing: float = 0.0
    class_weights: Sequence[float] | None = None
    balance_sampler: bool = False
    warmup_epochs: float = 0.0
    seed: int = 0
    quiet: bool = False


@dataclass
class HeadResult:
    """The trained head and what happened."""

    head: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    epochs_run: int = 0


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """``n / (k * count_c)`` per class, as scikit-learn's ``class_weight='balanced'``."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    return (len(labels) / (num_classes * counts)).tolist()


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int,
            sampler_weights: np.ndarray | None = None) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y).long())
    g = torch.Generator().manual_seed(seed)
    if sampler_weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(sampler_weights, dtype=torch.double),
                                                         num_samples=len(y), replacement=True, generator=g)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             num_classes: int, cfg: HeadConfig, log_dir: str | os.PathLike[str] | None = None,
             history: History | None = None) -> HeadResult:
    """Train a linear or MLP head on features with early stopping; returns the best-val-loss head.

    Example:
        >>> result = fit_head(xtr, ytr, xva, yva, num_classes=10, cfg=HeadConfig())  # doctest: +SKIP
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    head = build_head(train_x.shape[1], num_classes, cfg.hidden, cfg.dropout)
    head[0].set_stats(torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)))
    module = ClassifierModule(head, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              label_smoothing=cfg.label_smoothing, class_weights=cfg.class_weights,
                              warmup_epochs=cfg.warmup_epochs)
    sampler_w = None
    if cfg.balance_sampler:
        sampler_w = np.asarray(balanced_class_weights(train_y, num_classes))[train_y]
    train_loader = _loader(train_x, train_y, cfg.batch_size, True, cfg.seed, sampler_w)
    has_val = len(val_y) > 0
    val_loader = _loader(val_x, val_y, 1024, False, cfg.seed) if has_val else None
    hist = history or History(None, "head")
    best = BestWeights("val_loss" if has_val else "train_loss")
    callbacks: list[Any] = [hist, best]
    if has_val:
        callbacks.append(EarlyStopping("val_loss", patience=cfg.patience, mode="min"))
    trainer = make_trainer(log_dir, max_epochs=cfg.epochs, callbacks=callbacks, quiet=cfg.quiet,
                           version="head", accelerator="cpu", devices=1)
    module.train()
    trainer.fit(module, train_loader, val_loader)
    head.eval()
    return HeadResult(head, hist.rows, best.best_epoch + 1, trainer.current_epoch)
