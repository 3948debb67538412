"""The report's interpretation sections: calibration, top losses with Grad-CAM, a prediction grid,
and ROC / precision-recall for two classes."""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

from .calibration import expected_calibration_error, reliability_bins
from .interpret import explain_image, gallery_png, load_display
from .outputs import SplitResult
from .plots import figure_png, plt
from .report import data_uri

__all__ = ["report_sections", "reliability_png", "binary_curves"]


def reliability_png(curves: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per (label, probs, y)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for label, probs, y in curves:
        bins = [b for b in reliability_bins(probs, y) if b["count"]]
        ece = expected_calibration_error(probs, y)
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-o", ms=4,
                label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("reliability diagram (validation)")
    return figure_png(fig)


def binary_curves(test: SplitResult, val: SplitResult | None, labels: Sequence[str]) -> tuple[bytes, dict[str, Any]]:
    """ROC and precision-recall of the positive class (``labels[1]``) with AUCs, and the decision
    threshold that maximises F1 on the validation split."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y = (test.y_true == 1).astype(int)
    s = test.probs[:, 1]
    info: dict[str, Any] = {"positive": labels[1]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if len(set(y)) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        info["roc_auc"] = float(roc_auc_score(y, s))
        info["average_precision"] = float(average_precision_score(y, s))
        axes[0].plot(fpr, tpr, label=f"AUC {info['roc_auc']:.3f}")
        axes[0].plot([0, 1], [0, 1], "k--", lw=1)
        axes[1].plot(rec, prec, label=f"AP {info['average_precision']:.3f}")
    for ax, (xl, yl, t) in zip(axes, (("false positive rate", "true positive rate", "ROC (test)"),
                                       ("recall", "precision", "precision-recall (test)"))):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"{t}, positive = {labels[1]}")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    if val is not None and len(set(val.y_true.tolist())) == 2:
        vy, vs = (val.y_true == 1).astype(int), val.probs[:, 1]
        best, best_f1 = 0.5, -1.0
        for t in np.unique(vs):
            pred = vs >= t
            tp = int((pred & (vy == 1)).sum())
            f1 = 2 * tp / max(1, pred.sum() + vy.sum())
            if f1 > best_f1:
                best, best_f1 = float(t), f1
        info["suggested_threshold"] = best
        info["val_f1_at_threshold"] = best_f1
    return figure_png(fig), info


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{data_uri(png)}'>"


def report_sections(model: Any, labels: Sequence[str], test: SplitResult | None, val: SplitResult | None,
                    calibration: dict[str, Any] | None = None, val_probs_uncalibrated: np.ndarray | None = None,
                    n_losses: int = 8, n_grid: int = 16, seed: int = 0) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(heading, HTML) sections for the report, and extra metrics (binary curves) for metrics.json."""
    sections: list[tuple[str, str]] = []
    extra: dict[str, Any] = {}
    if val is not None and calibration and val_probs_uncalibrated is not None and len(val.y_true):
        png = reliability_png([("before", val_probs_uncalibrated, val.y_true), ("after", val.probs, val.y_true)])
        t = calibration.get("temperature", 1.0)
        body = (f"<p>Temperature scaling fitted on the validation split: T = {t:.3f}. Expected calibration error "
                f"(ECE, validation) before: <b>{calibration.get('val_ece_before', float('nan')):.4f}</b>, after: "
                f"<b>{calibration.get('val_ece_after', float('nan')):.4f}</b>. Predictions use the calibrated "
                "probabilities (<code>predict --no-calibration</code> turns it off); the ranking of classes "
                "never changes.</p>" + _img(png, "reliability diagram"))
        sections.append(("Calibration", body))
    if test is None or not len(test.y_true):
        return sections, extra
    pred = test.probs.argmax(1)
    wrong = np.flatnonzero(pred != test.y_true)
    order = wrong[np.argsort(-test.probs[wrong, pred[wrong]])][:n_losses]
    if len(order) and model is not None:
        items = []
        size = model.preprocessing.size
        for i in order:
            try:
                img = explain_image(model, test.paths[i], int(pred[i]))[0]
            except Exception:
                img = load_display(test.paths[i], size)
            items.append((img, f"true {labels[test.y_true[i]]}\npred {labels[pred[i]]} ({test.probs[i, pred[i]]:.2f})",
                          False))
        sections.append(("Top losses", "<p>The test images the model got most confidently wrong, with a Grad-CAM "
                         "heat map of where the network looked for the predicted class.</p>" +
                         _img(gallery_png(items), "top losses with Grad-CAM")))
    elif not len(wrong):
        sections.append(("Top losses", "<p>No test image was misclassified.</p>"))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test.y_true), size=min(n_grid, len(test.y_true)), replace=False)
    items = [(load_display(test.paths[i], 128),
              f"{labels[pred[i]]} ({test.probs[i, pred[i]]:.2f})\ntrue {labels[test.y_true[i]]}",
              bool(pred[i] == test.y_true[i])) for i in pick]
    sections.append(("Random test predictions", "<p>Green: right, red: wrong.</p>" +
                     _img(gallery_png(items), "random test images with predictions")))
    if len(labels) == 2:
        png, info = binary_curves(test, val, labels)
        extra["binary"] = info
        txt = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        sections.append(("ROC and precision-recall", f"<p>{html.escape(txt)}</p>" + _img(png, "ROC and PR curves")))
    return sections, extra
