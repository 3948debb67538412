"""Calibration: expected calibration error, reliability diagrams and temperature scaling."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .metrics import softmax

__all__ = ["expected_calibration_error", "fit_temperature", "apply_temperature", "reliability_bins",
           "calibrated_nll", "multilabel_nll"]


def reliability_bins(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> list[dict[str, Any]]:
    """Per confidence bin: count, mean confidence and accuracy of the top-1 predictions."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == y) if len(probs) else np.zeros(0, dtype=bool)
    edges = np.linspace(0, 1, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        out.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else None,
                    "accuracy": float(correct[m].mean()) if m.any() else None})
    return out


def expected_calibration_error(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> float:
    """ECE: the bin-weighted mean gap between confidence and accuracy (0 is perfectly calibrated)."""
    n = len(y)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["confidence"] - b["accuracy"])
                     for b in reliability_bins(probs, y, n_bins) if b["count"]))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities as if their logits were divided by ``temperature`` (argmax unchanged)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None)), temperature)


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
