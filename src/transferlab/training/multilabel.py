"""Multi-label heads on cached features: sigmoid outputs, binary cross-entropy, one threshold per label.

The head is the multi-label counterpart of the probe (:func:`~transferlab.training.head.fit_probe`): one
L2-regularised logistic regression per label (binary cross-entropy on sigmoid outputs), all labels fitted
together by full-batch L-BFGS on standardised features, the regularisation chosen on the validation split.
The decision threshold of each label is then tuned on the validation split, which is how a rare label's
imbalance is met by default: weighting each label's positives by its negatives-to-positives ratio
(``--balance weights``, :func:`pos_weights`) lowered mAP on both composite benchmarks (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..backbones.models import build_head
from .callbacks import History
from .head import PROBE_CS, HeadResult

__all__ = ["fit_multilabel_probe", "label_matrix", "pos_weights", "tune_thresholds", "MAX_POS_WEIGHT"]

log = logging.getLogger("transferlab")

#: The most a positive image of a rare label counts, relative to a negative one.
MAX_POS_WEIGHT = 50.0


def label_matrix(labels: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """``(n, len(classes))`` 0/1 matrix: row ``i`` marks the labels of image ``i``."""
    col = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for i, row in enumerate(labels):
        for c in row:
            y[i, col[c]] = 1.0
    return y


def pos_weights(y: np.ndarray) -> np.ndarray:
    """Per label: negatives over positives, between 1 and :data:`MAX_POS_WEIGHT` (1 for a label with no
    positive image, which then has nothing to weigh)."""
    pos = y.sum(0)
    w = (len(y) - pos) / np.maximum(pos, 1.0)
    return np.clip(np.where(pos > 0, w, 1.0), 1.0, MAX_POS_WEIGHT).astype(np.float32)


def _bce(logits: torch.Tensor, y: torch.Tensor, pw: torch.Tensor | None) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)


def fit_multilabel_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                         cs: Sequence[float] = PROBE_CS, history: History | None = None,
                         max_iter: int = 200, pos_weight: np.ndarray | None = None) -> HeadResult:
    """A linear multi-label head (``Standardize -> Linear``, sigmoid outputs) fitted by L-BFGS.

    The inverse regularisation strengths ``cs`` are the single-label probe's, in scikit-learn's terms
    (an L2 penalty of ``1 / (2 C n)`` on the mean loss over ``n`` images). Each is fitted from the
    strongest penalty to the weakest, warm-started; the one with the lowest weighted binary cross-entropy
    on the validation split is kept (the middle one without validation). ``pos_weight``: per label, how much
    a positive image counts against a negative one (default 1).

    Example:
        >>> result = fit_multilabel_probe(xtr, ytr, xva, yva)  # doctest: +SKIP
        >>> probs = sigmoid(result.head(torch.from_numpy(xte)).detach().numpy())  # doctest: +SKIP
    """
    head = build_head(train_x.shape[1], train_y.shape[1], (), 0.0)
    std, linear = head[0], head[-1]
    xtr_t = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    std.set_stats(xtr_t)
    with torch.no_grad():
        xtr = std(xtr_t)
        xva = std(torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float32)))
    ytr = torch.from_numpy(np.asarray(train_y, np.float32))
    yva = torch.from_numpy(np.asarray(val_y, np.float32))
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    prior = (ytr.mean(0).clamp(1e-3, 1 - 1e-3))
    w = torch.zeros(train_y.shape[1], xtr.shape[1], requires_grad=True)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    hist = history if history is not None else History(None, "head")
    fitted: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    decays = sorted((1.0 / (c * len(train_x)) for c in cs), reverse=True)
    best, best_loss = decays[len(decays) // 2], None
    for k, decay in enumerate(decays):
        t0 = time.perf_counter()
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _bce(xtr @ w.T + b, ytr, pw) * ytr.shape[1] + 0.5 * decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        fitted[decay] = (w.detach().clone(), b.detach().clone())
        with torch.no_grad():
            train_loss = float(_bce(xtr @ w.T + b, ytr, pw))
            val_loss = float(_bce(xva @ w.T + b, yva, pw)) if len(yva) else float("nan")
        hist.rows.append({"epoch": k + 1, "phase": hist.phase, "train_loss": train_loss, "val_loss": val_loss,
                          "lr": 1.0 / (decay * len(train_x)), "seconds": round(time.perf_counter() - t0, 3)})
        if len(yva) and (best_loss is None or val_loss < best_loss):
            best, best_loss = decay, val_loss
    hist.write()
    with torch.no_grad():
        linear.weight.copy_(fitted[best][0])
        linear.bias.copy_(fitted[best][1])
    c = 1.0 / (best * len(train_x))
    log.info("multi-label probe head: C=%g chosen on validation", c)
    head.eval()
    return HeadResult(head, hist.rows, decays.index(best) + 1, len(decays), c=c)


def tune_thresholds(probs: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    """One decision threshold per label: the one that maximises the label's F1 on ``(probs, y)`` (the
    validation split), kept within ``[low, high]``; 0.5 for a label with no positive image there.

    Example:
        >>> tune_thresholds(np.array([[0.9], [0.4], [0.2]]), np.array([[1], [1], [0]]))
        array([0.4])
    """
    from sklearn.metrics import precision_recall_curve

    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        if y[:, j].sum() == 0:
            continue
        precision, recall, thresholds = precision_recall_curve(y[:, j], probs[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        out[j] = float(np.clip(thresholds[int(np.argmax(f1))], low, high))
    return out
