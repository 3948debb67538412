"""Probabilities from logits and temperature scaling: the arithmetic that training, evaluation and
prediction share, below all of them (nothing here imports the rest of transferlab)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["softmax", "sigmoid", "apply_temperature", "fit_temperature", "calibrated_nll", "multilabel_nll"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64 for stability)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function (float64, stable for large magnitudes)."""
    z = np.asarray(logits, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities as if their logits were divided by ``temperature`` (argmax unchanged)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None)), temperature)


def fit_temperature(probs: np.ndarray, y: Sequence[int], lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature minimising validation negative log-likelihood (golden-section search on log T).

    One scalar, so the ranking of classes, and therefore every prediction, stays the same.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        return 1.0
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None))

    def nll(log_t: float) -> float:
        p = softmax(logp, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))

    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    t = float(np.exp((a + b) / 2))
    return t if nll(np.log(t)) <= nll(0.0) else 1.0


def calibrated_nll(probs: np.ndarray, y: Sequence[int]) -> float:
    """Negative log-likelihood after temperature scaling fitted on these same rows: the loss the
    delivered (calibrated) model reaches, blind to a uniform over- or under-confidence such as label
    smoothing's. Comparing models by it does not favour the one trained without smoothing."""
    y = np.asarray(y, dtype=np.int64)
    p = apply_temperature(probs, fit_temperature(probs, y))
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def multilabel_nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid probabilities against a 0/1 label matrix."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
