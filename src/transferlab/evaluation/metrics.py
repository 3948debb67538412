"""Classification metrics as pure functions of labels and probabilities (scikit-learn underneath)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from ..probability import softmax
from .stats import as_list as _ci, bootstrap_f1, wilson_interval

__all__ = ["classification_metrics", "top_k_accuracy", "most_confused", "softmax"]


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` most probable."""
    if len(y_true) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean([y in row for y, row in zip(y_true, top)]))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str],
                           top_k: Sequence[int] = (1, 3, 5)) -> dict[str, Any]:
    """Accuracy, macro-F1, top-k accuracy, per-class precision/recall/F1/support and the confusion matrix,
    each figure with its 95% interval (``*_ci``: Wilson for accuracy, precision and recall; a bootstrap
    over the images for F1; see :mod:`transferlab.evaluation.stats`).

    The keys are those of ``metrics.json`` (see DESIGN.md).
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k_all = list(range(len(labels)))
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {"n": int(len(y)), "labels": list(labels)}
    if len(y) == 0:
        out.update(accuracy=None, macro_f1=None, weighted_f1=None, top_k_accuracy={}, per_class={},
                   confusion_matrix=[[0] * len(labels) for _ in labels])
        return out
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=k_all, zero_division=0)
    cm = confusion_matrix(y, pred, labels=k_all)
    macro_ci, f1_ci = bootstrap_f1(y, pred, len(labels))
    out["accuracy"] = float(accuracy_score(y, pred))
    out["accuracy_ci"] = _ci(wilson_interval(int(np.trace(cm)), len(y)))
    out["macro_f1"] = float(f1_score(y, pred, labels=k_all, average="macro", zero_division=0))
    out["macro_f1_ci"] = _ci(macro_ci)
    out["weighted_f1"] = float(f1_score(y, pred, labels=k_all, average="weighted", zero_division=0))
    out["top_k_accuracy"] = {str(k): top_k_accuracy(y, probs, k) for k in top_k if k <= len(labels)}
    predicted = cm.sum(0)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i]),
                               "precision_ci": _ci(wilson_interval(int(cm[i, i]), int(predicted[i]))),
                               "recall_ci": _ci(wilson_interval(int(cm[i, i]), int(s[i]))),
                               "f1_ci": _ci(f1_ci[i])} for i, name in enumerate(labels)}
    out["confusion_matrix"] = cm.tolist()
    out["intervals"] = {"level": 0.95, "accuracy, precision, recall": "Wilson score",
                        "f1": "percentile bootstrap over the images (1000 resamples)"}
    return out



def most_confused(cm: Sequence[Sequence[int]], labels: Sequence[str], n: int = 5) -> list[tuple[str, str, int]]:
    """The ``n`` largest off-diagonal cells: (true label, predicted label, count)."""
    arr = np.asarray(cm)
    pairs = [(labels[i], labels[j], int(arr[i, j])) for i in range(len(labels)) for j in range(len(labels))
             if i != j and arr[i, j] > 0]
    return sorted(pairs, key=lambda t: -t[2])[:n]
