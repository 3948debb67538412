"""Writing the evaluation files of a run directory: metrics.json, plots, predictions.csv, report.html."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import write_json, write_text
from .metrics import classification_metrics
from .plots import confusion_png, curves_png
from .report import render_report

__all__ = ["SplitResult", "write_run_outputs", "predictions_csv"]


class SplitResult:
    """Labels, probabilities and paths of one evaluated split."""

    def __init__(self, y_true: Sequence[int], probs: np.ndarray, paths: Sequence[str]) -> None:
        self.y_true = np.asarray(y_true, dtype=np.int64)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.paths = list(paths)


def predictions_csv(result: SplitResult, labels: Sequence[str]) -> str:
    """``path,true_label,predicted_label,probability`` plus one ``p_<class>`` column per class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "predicted_label", "probability", *(f"p_{c}" for c in labels)])
    for path, y, p in zip(result.paths, result.y_true, result.probs):
        k = int(np.argmax(p))
        w.writerow([path, labels[y], labels[k], repr(float(p[k])), *(repr(float(v)) for v in p)])
    return buf.getvalue()


def write_run_outputs(out: str | os.PathLike[str], *, labels: Sequence[str], test: SplitResult | None,
                      val: SplitResult | None, history: Sequence[dict[str, Any]], summary: dict[str, Any],
                      extra_metrics: dict[str, Any] | None = None, counts: dict | None = None,
                      skipped: Sequence[tuple[str, str]] = (), warnings: Sequence[str] = (),
                      title: str = "transferlab run", top_k: Sequence[int] = (1, 3, 5),
                      extra_sections: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Compute metrics and write every evaluation file into ``out``; returns the metrics dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    for name, res in (("val", val), ("test", test)):
        metrics[name] = classification_metrics(res.y_true, res.probs, labels, top_k) if res is not None else None
    metrics.update(extra_metrics or {})
    main = test if test is not None and len(test.y_true) else val
    images: dict[str, bytes] = {"curves": curves_png(history)}
    main_metrics = metrics["test"] if main is test else metrics["val"]
    if main is not None and main_metrics:
        images["confusion"] = confusion_png(main_metrics["confusion_matrix"], labels)
        images["confusion_norm"] = confusion_png(main_metrics["confusion_matrix"], labels, normalize=True)
        write_text(out / "predictions.csv", predictions_csv(main, labels))
    (out / "curves.png").write_bytes(images["curves"])
    if "confusion" in images:
        (out / "confusion_matrix.png").write_bytes(images["confusion"])
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.html", render_report(title=title, metrics=metrics, images=images, summary=summary,
                                                  counts=counts, skipped=skipped, warnings=warnings,
                                                  extra_sections=extra_sections))
    return metrics
