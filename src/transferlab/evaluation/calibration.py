"""Calibration: expected calibration error, reliability diagrams and temperature scaling."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..probability import apply_temperature, calibrated_nll, fit_temperature, multilabel_nll

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
