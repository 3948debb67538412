"""The report's section on the race of training recipes: a table of every candidate's rungs and a plot of
validation accuracy against seconds, one line per candidate and one for the survivor."""

from __future__ import annotations

import html
from typing import Any

from .plots import figure_png, plt
from .report import _table, data_uri

__all__ = ["race_png", "race_section"]


def race_png(record: dict[str, Any]) -> bytes:
    """Validation accuracy against seconds of training: each rung of each candidate, and the survivor."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for cand in record.get("candidates", []):
        for rung in cand.get("rungs", []):
            pts = [(v["seconds"], v["val_acc"]) for v in rung.get("validations", []) if v.get("val_acc") is not None]
            if pts:
                ax.plot(*zip(*pts), "-o", ms=3, label=f"{cand['name']} rung {rung['rung']}")
    surv = record.get("survivor") or {}
    pts = [(v["seconds"], v["val_acc"]) for v in surv.get("validations", []) if v.get("val_acc") is not None]
    if pts:
        ax.plot(*zip(*pts), "-s", ms=4, lw=2, color="black", label=f"survivor {surv.get('name')}")
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    ax.set_title("the race of training recipes")
    return figure_png(fig)


def _fate(surv: dict[str, Any]) -> str:
    """Whether the survivor's fine-tuning was kept, and which of its weights."""
    if not surv.get("kept"):
        return "not better than the head, which was kept"
    return "kept (its final weights)" if surv.get("weights") == "final" else "kept (its best validated weights)"


def race_section(record: dict[str, Any], budget: dict[str, Any] | None = None) -> tuple[str, str]:
    """(heading, HTML): what raced, what each rung said, who survived and what the budget left unused."""
    rows = []
    for cand in record.get("candidates", []):
        rungs = cand.get("rungs") or [{}]
        for r in rungs:
            rows.append([cand["name"], cand["description"], r.get("rung", "—"), r.get("slice_s"), r.get("seconds"),
                         r.get("epochs"), r.get("val_acc"), cand.get("status", "")])
    surv = record.get("survivor") or {}
    shortened = (f", its schedule shortened to {surv['shortened_to']:g} epochs to anneal before the limit"
                 if surv.get("shortened_to") else "")
    text = (f"<p>Winner: <b>{html.escape(str(record.get('winner')))}</b> ({html.escape(record.get('reason', ''))}). "
            f"Survivor: {html.escape(str(surv.get('why', '')))}; ran {surv.get('epochs_run', 0)} epoch(s) in "
            f"{surv.get('seconds', 0):.0f}s{' on mixed batches (MixUp, CutMix)' if surv.get('mixup') else ''}, "
            f"{_fate(surv)}"
            f"{', converged (early stopping)' if surv.get('stopped_early') else ''}"
            f"{', stopped by the time limit' if surv.get('stopped_by_time') else ''}"
            f"{shortened}.</p>")
    if budget and budget.get("limit_s"):
        text += (f"<p>Budget {budget['limit_s']:.0f}s, used {budget['used_s']:.0f}s, unused "
                 f"{budget['unused_s']:.0f}s: {html.escape(budget['why'])}.</p>")
    table = _table(["candidate", "what", "rung", "slice (s)", "seconds", "epochs", "best val acc", "fate"], rows)
    return "Training strategy: the race", text + table + f"<img alt='race' src='{data_uri(race_png(record))}'>"
