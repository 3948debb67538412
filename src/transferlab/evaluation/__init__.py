"""Evaluation: metrics (pure functions), plots and the report (matplotlib only here)."""

from .metrics import classification_metrics, most_confused, softmax, top_k_accuracy
from .outputs import SplitResult, predictions_csv, write_run_outputs
from .plots import confusion_png, curves_png, figure_png
from .report import data_uri, render_report

__all__ = ["classification_metrics", "most_confused", "softmax", "top_k_accuracy", "SplitResult",
           "predictions_csv", "write_run_outputs", "confusion_png", "curves_png", "figure_png", "data_uri",
           "render_report"]
