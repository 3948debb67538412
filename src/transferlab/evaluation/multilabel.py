"""Multi-label evaluation: metrics (mAP, micro/macro F1, per-label figures), PR curves, report sections,
predictions.csv and the files of a run directory."""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, precision_recall_fscore_support

from .._io import write_json, write_text
from .interpret import explain_image, gallery_png, load_display
from .plots import curves_png, figure_png, plt
from .report import data_uri, render_report

__all__ = ["MultiLabelResult", "multilabel_metrics", "pr_curves_png", "multilabel_sections",
           "multilabel_predictions_csv", "write_multilabel_outputs", "decide"]


class MultiLabelResult:
    """0/1 label matrix, sigmoid probabilities and paths of one evaluated split."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, paths: Sequence[str]) -> None:
        self.y_true = np.asarray(y_true, dtype=np.int64).reshape(len(paths), -1)
        self.probs = np.asarray(probs, dtype=np.float64).reshape(len(paths), -1)
        self.paths = list(paths)


def decide(probs: np.ndarray, thresholds: Sequence[float] | float) -> np.ndarray:
    """0/1 decisions: a label is on when its probability reaches its threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)).astype(np.int64)


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float],
                       labels: Sequence[str]) -> dict[str, Any]:
    """mAP (macro average precision over the labels with a positive image), micro and macro F1, subset
    accuracy (every label right), Hamming accuracy, label cardinality (true and predicted) and per-label
    precision/recall/F1/AP/support/threshold. Keys are those of ``metrics.json``."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = decide(probs, thresholds)
    p, r, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    ap = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        if y[:, j].any():
            ap[j] = average_precision_score(y[:, j], probs[:, j])
    micro = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    scored = ~np.isnan(ap)
    return {
        "task": "multilabel", "n": int(len(y)),
        "mAP": float(ap[scored].mean()) if scored.any() else None,
        "micro_f1": float(micro[2]), "micro_precision": float(micro[0]), "micro_recall": float(micro[1]),
        "macro_f1": float(np.mean(f1[y.sum(0) > 0])) if (y.sum(0) > 0).any() else None,
        "subset_accuracy": float(np.mean((pred == y).all(1))) if len(y) else None,
        "hamming_accuracy": float(np.mean(pred == y)) if len(y) else None,
        "label_cardinality": float(y.sum(1).mean()) if len(y) else None,
        "predicted_cardinality": float(pred.sum(1).mean()) if len(y) else None,
        "per_label": {name: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f1[j]),
                             "ap": None if np.isnan(ap[j]) else float(ap[j]), "support": int(support[j]),
                             "threshold": float(np.asarray(thresholds).reshape(-1)[j] if np.ndim(thresholds)
                                                else thresholds)}
                      for j, name in enumerate(labels)},
        "labels": list(labels),
    }


def pr_curves_png(y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> bytes:
    """One precision-recall curve per label (with its AP), the tuned threshold's operating point marked."""
    n = len(labels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (ax, name) in enumerate(zip(axes.flat, labels)):
        ax.axis("on")
        if not y_true[:, j].any():
            ax.set_title(f"{name}: no positive image", fontsize=8)
            continue
        precision, recall, cuts = precision_recall_curve(y_true[:, j], probs[:, j])
        ax.plot(recall, precision, lw=1.5)
        on = probs[:, j] >= thresholds[j]
        tp = int((on & (y_true[:, j] == 1)).sum())
        ax.plot(tp / max(1, y_true[:, j].sum()), tp / max(1, on.sum()), "o", color="#cf222e")
        ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{name}  AP {average_precision_score(y_true[:, j], probs[:, j]):.3f}", fontsize=8)
    fig.suptitle("Precision-recall per label (dot: the threshold tuned on validation)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{data_uri(png)}'>"


def _per_label_table(m: dict[str, Any]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("label", "AP", "precision", "recall", "F1", "support", "threshold"))
    rows = []
    for name, v in m["per_label"].items():
        ap = "—" if v["ap"] is None else f"{v['ap']:.3f}"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{ap}</td><td>{v['precision']:.3f}</td>"
                    f"<td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td><td>{v['support']}</td>"
                    f"<td>{v['threshold']:.3f}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}"


def multilabel_sections(model: Any, labels: Sequence[str], test: MultiLabelResult | None,
                        thresholds: Sequence[float], metrics: dict[str, Any] | None, pr_png: bytes,
                        n_labels_shown: int = 12) -> list[tuple[str, str]]:
    """(heading, HTML) sections: headline figures, per-label table, PR curves, and per label the test image
    with the highest loss for that label, with a Grad-CAM map of where the network looked for it."""
    if test is None or not len(test.y_true) or not metrics:
        return []
    m = metrics
    head = (f"<p>mAP <b>{_fmt(m['mAP'])}</b>, micro-F1 <b>{_fmt(m['micro_f1'])}</b>, macro-F1 "
            f"{_fmt(m['macro_f1'])}, subset accuracy (every label right) {_fmt(m['subset_accuracy'])}, "
            f"Hamming accuracy {_fmt(m['hamming_accuracy'])}; labels per image {_fmt(m['label_cardinality'])} "
            f"(predicted {_fmt(m['predicted_cardinality'])}); {m['n']} test images. A label is predicted when "
            "its probability reaches its threshold, tuned on the validation split for the best F1 "
            "(<code>predict --threshold</code> overrides).</p>")
    sections = [("Multi-label test metrics", head + _per_label_table(m)),
                ("Precision-recall curves", _img(pr_png, "precision-recall curves per label"))]
    eps = 1e-7
    loss = -(test.y_true * np.log(test.probs + eps) + (1 - test.y_true) * np.log(1 - test.probs + eps))
    items = []
    for j in np.argsort([-(m["per_label"][c]["support"]) for c in labels])[:n_labels_shown]:
        i = int(np.argmax(loss[:, j]))
        truth = "has" if test.y_true[i, j] else "lacks"
        caption = f"{labels[j]}: p={test.probs[i, j]:.2f}\n(image {truth} it)"
        right = bool((test.probs[i, j] >= thresholds[j]) == bool(test.y_true[i, j]))
        try:
            img = explain_image(model, test.paths[i], int(j))[0] if model is not None else None
        except Exception:
            img = None
        items.append((img if img is not None else load_display(test.paths[i], 128), caption, right))
    if items:
        sections.append(("Top losses per label", "<p>For each label, the test image the model got most wrong "
                         "for it (a missed label or a false one), with a Grad-CAM heat map of where the network "
                         "looked for that label. Red: the decision is wrong.</p>" +
                         _img(gallery_png(items), "top loss per label with Grad-CAM")))
    return sections


def multilabel_predictions_csv(result: MultiLabelResult, labels: Sequence[str], thresholds: Sequence[float]) -> str:
    """``path,true_labels,predicted_labels`` (``;``-separated) plus one ``p_<label>`` column per label."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_labels", "predicted_labels", *(f"p_{c}" for c in labels)])
    pred = decide(result.probs, thresholds)
    for path, y, d, p in zip(result.paths, result.y_true, pred, result.probs):
        w.writerow([path, ";".join(labels[j] for j in np.flatnonzero(y)), ";".join(labels[j] for j in np.flatnonzero(d)),
                    *(repr(float(v)) for v in p)])
    return buf.getvalue()


def write_multilabel_outputs(out: str | os.PathLike[str], *, model: Any, labels: Sequence[str],
                             thresholds: Sequence[float], test: MultiLabelResult | None, val: MultiLabelResult | None,
                             history: Sequence[dict[str, Any]], summary: dict[str, Any],
                             extra_metrics: dict[str, Any] | None = None, counts: dict | None = None,
                             skipped: Sequence[tuple[str, str]] = (), warnings: Sequence[str] = (),
                             title: str = "transferlab run") -> dict[str, Any]:
    """metrics.json, predictions.csv, pr_curves.png, curves.png and report.html of a multi-label run or
    evaluation; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"task": "multilabel", "thresholds": dict(zip(labels, map(float, thresholds)))}
    for name, res in (("val", val), ("test", test)):
        metrics[name] = (multilabel_metrics(res.y_true, res.probs, thresholds, labels)
                         if res is not None and len(res.y_true) else None)
    metrics.update(extra_metrics or {})
    write_json(out / "metrics.json", metrics)
    main = test if test is not None and len(test.y_true) else val
    curves = curves_png(history)
    (out / "curves.png").write_bytes(curves)
    sections: list[tuple[str, str]] = []
    if main is not None and len(main.y_true):
        write_text(out / "predictions.csv", multilabel_predictions_csv(main, labels, thresholds))
        pr_png = pr_curves_png(main.y_true, main.probs, list(thresholds), labels)
        (out / "pr_curves.png").write_bytes(pr_png)
        sections = multilabel_sections(model, labels, main, thresholds,
                                       metrics["test"] if main is test else metrics["val"], pr_png)
    headline = metrics["test"] or metrics["val"] or {}
    cards = {"test": {k: headline.get(k) for k in ("mAP", "micro_f1", "n")}}
    write_text(out / "report.html", render_report(title=title, metrics=cards, images={"curves": curves},
                                                  summary=summary, counts=counts, skipped=skipped,
                                                  warnings=warnings, extra_sections=sections))
    return metrics
