"""Plots (matplotlib, Agg backend, used only in this package): PNG bytes ready to save or embed."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["curves_png", "confusion_png", "figure_png", "lr_find_png", "scatter_png"]


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """Render and close a matplotlib figure; returns PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def curves_png(history: Sequence[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch, train and val; phases (head, fine-tune) follow one another."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [_num(r.get(f"{split}_{metric}")) for r in history]
            if any(not math.isnan(v) for v in ys):
                ax.plot(x, ys, style, ms=3, label=split)
        phases = [r.get("phase", "") for r in history]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i + 0.5, color="grey", ls="--", lw=1)
                ax.text(i + 0.6, ax.get_ylim()[1], f" {phases[i]}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    if not history:
        for ax in axes:
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
    return figure_png(fig)


def confusion_png(cm: Sequence[Sequence[int]], labels: Sequence[str], normalize: bool = False,
                  title: str | None = None) -> bytes:
    """Confusion matrix heat map with counts (or row-normalised rates) in the cells."""
    arr = np.asarray(cm, dtype=np.float64)
    if normalize:
        rows = arr.sum(axis=1, keepdims=True)
        arr = np.divide(arr, rows, out=np.zeros_like(arr), where=rows > 0)
    n = len(labels)
    size = min(14, max(4, 0.55 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(arr, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, arr.max()))
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix (counts)"))
    if n <= 30:
        top = arr.max() if arr.size else 1
        for i in range(n):
            for j in range(n):
                v = arr[i, j]
                txt = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * top else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return figure_png(fig)


def lr_find_png(lrs, losses, suggestion: float | None) -> bytes:
    """Loss against learning rate (log axis), with the suggested rate marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("learning-rate finder")
    if suggestion:
        ax.axvline(suggestion, color="red", ls="--", label=f"suggested {suggestion:.2e}")
        ax.legend()
    ax.grid(alpha=0.3, which="both")
    return figure_png(fig)


def scatter_png(points, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labelled scatter plot of ``(label, x, y)`` points (e.g. accuracy against latency)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, x, y in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return figure_png(fig)
