"""Training a head on cached features (``--mode head``): seconds on a CPU.

A linear head is fitted as the frozen-feature probe of the transfer-learning literature: an
L2-regularised multinomial logistic regression (scikit-learn, L-BFGS), its regularisation chosen on
the validation split (Kornblith et al. 2019; CLIP's linear probes). On real data this beat the
linear head trained by Adam with early stopping (BENCHMARKS.md). An MLP head trains by gradient.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..backbones.models import build_head
from ..config import TrainConfig
from .callbacks import BestWeights, History
from .module import ClassifierModule
from .trainer import make_trainer

__all__ = ["HeadConfig", "HeadResult", "fit_head", "fit_probe", "balanced_class_weights", "PROBE_CS"]

log = logging.getLogger("transferlab")

#: Inverse regularisation strengths tried on standardised features (unit mean variance).
PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
#: The probe standardises each feature by its training spread, but never below this share of the average.
PROBE_SPREAD_FLOOR = 0.1


@dataclass
class HeadConfig:
    """How the head is trained. Defaults follow the Keras transfer-learning guide (Adam-type optimiser
    at 1e-3 on frozen features) with early stopping on the validation loss.

    hidden: MLP widths (empty: linear head). dropout: after each hidden layer (and before a linear head).
    epochs: at most. patience: epochs without val-loss improvement before stopping.
    """

    hidden: Sequence[int] = TrainConfig.head
    dropout: float = TrainConfig.dropout
    epochs: int = TrainConfig.epochs
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    batch_size: int = TrainConfig.batch_size
    patience: int = TrainConfig.patience
    label_smoothing: float = TrainConfig.label_smoothing
    class_weights: Sequence[float] | None = None
    balance_sampler: bool = False
    seed: int = TrainConfig.seed
    quiet: bool = False


@dataclass
class HeadResult:
    """The trained head and what happened."""

    head: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    epochs_run: int = 0
    c: float | None = None  # the probe's chosen inverse regularisation (linear heads)


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


def _subsample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` indices, stratified by label and seeded."""
    if len(y) <= n:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[: max(1, round(n * np.mean(y == c)))] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
              cfg: HeadConfig, cs: Sequence[float] = PROBE_CS, search_n: int = 10_000,
              history: History | None = None) -> HeadResult:
    """A linear head fitted as a logistic-regression probe, with ``C`` chosen on the validation split.

    Features are standardised as the head's :class:`Standardize` layer does; each ``C`` in ``cs`` is
    fitted (warm-started, weakest regularisation last) on at most ``search_n`` training images, the one
    with the lowest validation log-loss (smoother than accuracy on a small split) is refitted on every training image, starting from the subsample's solution. Without
    validation images the middle ``C`` is used. Class weights in ``cfg`` become sample weights.

    Example:
        >>> result = fit_probe(xtr, ytr, xva, yva, num_classes=10, cfg=HeadConfig())  # doctest: +SKIP
    """
    from sklearn.linear_model import LogisticRegression

    head = build_head(train_x.shape[1], num_classes, (), 0.0)
    std = head[0]
    std.set_stats(torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)))
    mean, scale = std.mean.numpy().astype(np.float64), float(std.scale)
    xtr = (np.asarray(train_x, np.float64) - mean) / scale
    xva = (np.asarray(val_x, np.float64) - mean) / scale
    # each feature to unit variance for the fit (scikit-learn's StandardScaler), its factor folded into the
    # weights below, so the model keeps its one Standardize layer; a feature nearly constant in training is
    # amplified at most 1/PROBE_SPREAD_FLOOR times
    spread = np.maximum(xtr.std(0), PROBE_SPREAD_FLOOR) if len(xtr) > 1 else np.ones(xtr.shape[1])
    xtr, xva = xtr / spread, xva / spread
    weights = cfg.class_weights
    if weights is None and cfg.balance_sampler:
        weights = balanced_class_weights(train_y, num_classes)
    sw = np.asarray(weights, np.float64)[train_y] if weights is not None else None
    hist = history if history is not None else History(None, "head")
    present = np.unique(train_y)

    def fit(c: float, idx: np.ndarray, warm: LogisticRegression | None) -> LogisticRegression:
        clf = warm or LogisticRegression(max_iter=500, tol=1e-4, warm_start=True)
        clf.set_params(C=c)
        clf.fit(xtr[idx], train_y[idx], sample_weight=None if sw is None else sw[idx])
        return clf

    def scores(clf: LogisticRegression) -> tuple[float, float]:
        p = np.full((len(val_y), num_classes), 1e-12)
        p[:, clf.classes_] = np.clip(clf.predict_proba(xva), 1e-12, 1.0)
        return float(np.mean(p.argmax(1) == val_y)), float(-np.mean(np.log(p[np.arange(len(val_y)), val_y])))

    best_c, best_key = cs[len(cs) // 2], None
    if len(val_y):
        idx = _subsample(train_y, search_n, cfg.seed)
        clf, fitted = None, {}
        for k, c in enumerate(sorted(cs)):
            t0 = time.perf_counter()
            clf = fit(c, idx, clf)
            fitted[c] = copy.deepcopy(clf)
            acc, loss = scores(clf)
            p_tr = np.clip(clf.predict_proba(xtr[idx]), 1e-12, 1.0)
            train_loss = float(-np.mean(np.log(p_tr[np.arange(len(idx)), np.searchsorted(clf.classes_, train_y[idx])])))
            hist.rows.append({"epoch": k + 1, "phase": hist.phase, "train_loss": train_loss,
                              "train_acc": float(clf.score(xtr[idx], train_y[idx])), "val_loss": loss,
                              "val_acc": acc, "lr": c, "seconds": round(time.perf_counter() - t0, 3)})
            if best_key is None or (-loss, acc) > best_key:
                best_c, best_key = c, (-loss, acc)
        hist.write()
        if len(idx) == len(train_y) and clf is not None and best_c == sorted(cs)[-1]:
            final = clf
        else:
            warm = fitted[best_c] if np.array_equal(fitted[best_c].classes_, present) else None
            final = fit(best_c, np.arange(len(train_y)), warm)  # warm: a few iterations, not hundreds
    else:
        final = fit(best_c, np.arange(len(train_y)), None)
    coef = np.zeros((num_classes, xtr.shape[1]))
    bias = np.zeros(num_classes)
    if len(final.classes_) == 2 and final.coef_.shape[0] == 1:  # binary: logits (-z/2, z/2)
        coef[final.classes_] = np.stack([-final.coef_[0] / 2, final.coef_[0] / 2])
        bias[final.classes_] = [-final.intercept_[0] / 2, final.intercept_[0] / 2]
    else:
        coef[final.classes_], bias[final.classes_] = final.coef_, final.intercept_
    coef = coef / spread  # back to the Standardize layer's scale
    bias[np.setdiff1d(np.arange(num_classes), present)] = -30.0  # never predict a class absent from training
    with torch.no_grad():
        head[-1].weight.copy_(torch.from_numpy(coef).float())
        head[-1].bias.copy_(torch.from_numpy(bias).float())
    log.info("probe head: C=%g chosen on validation", best_c)
    head.eval()
    best = sorted(cs).index(best_c) + 1 if len(val_y) else 0
    return HeadResult(head, hist.rows, best, len(cs) if len(val_y) else 0, c=best_c)


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
                              label_smoothing=cfg.label_smoothing, class_weights=cfg.class_weights)
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
