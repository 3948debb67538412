"""``report.html``: one self-contained page (plots embedded as data URIs, no external requests)."""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Sequence

from .metrics import most_confused
from .stats import too_small_warning

__all__ = ["render_report", "data_uri", "REPORT_CSS"]

REPORT_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6475}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;min-width:130px}
.card b{display:block;font-size:1.5em}table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border:1px solid #dde1e7;padding:4px 10px;text-align:right}th{background:#eef1f5}
td:first-child,th:first-child{text-align:left}img{max-width:100%;background:#fff;border:1px solid #dde1e7}
.warn{background:#fff4e5;border:1px solid #f0b35b;padding:8px 12px;border-radius:6px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
"""


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI for an ``<img>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def with_ci(value: Any, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.912 (0.897–0.925)``: a figure with its 95% interval, as text."""
    if ci is None or value is None:
        return _fmt(value, digits)
    return f"{value:.{digits}f} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"


def _per_class(split: dict[str, Any]) -> str:
    rows = [[name, with_ci(m["precision"], m.get("precision_ci")), with_ci(m["recall"], m.get("recall_ci")),
             with_ci(m["f1"], m.get("f1_ci")), m["support"]] for name, m in split["per_class"].items()]
    stats = [(m["precision"], m["recall"], m["f1"], m["support"]) for m in split["per_class"].values()]
    if stats:
        n = sum(r[3] for r in stats) or 1
        rows.append(["macro avg", *(_fmt(sum(r[i] for r in stats) / len(stats), 3) for i in (0, 1)),
                     with_ci(split.get("macro_f1"), split.get("macro_f1_ci")), n])
        rows.append(["weighted avg", *(_fmt(sum(r[i] * r[3] for r in stats) / n, 3) for i in (0, 1, 2)), n])
    return ("<p class='sub'>Each figure with its 95% interval: Wilson for precision and recall, a bootstrap over "
            "the images for F1.</p>" + _table(["class", "precision", "recall", "F1", "support"], rows))


def render_report(*, title: str, metrics: dict[str, Any], images: dict[str, bytes],
                  summary: dict[str, Any], counts: dict[str, dict[str, int]] | None = None,
                  skipped: Sequence[tuple[str, str]] = (), warnings: Sequence[str] = (),
                  extra_sections: Sequence[tuple[str, str]] = ()) -> str:
    """The report page. ``images`` maps names (``curves``, ``confusion``, ``confusion_norm``) to PNG bytes;
    ``extra_sections`` are (heading, HTML) pairs appended in order."""
    test = metrics.get("test") or {}
    val = metrics.get("val") or {}
    cards = []
    for label, value, ci in (("test mAP", test.get("mAP"), None), ("test micro-F1", test.get("micro_f1"), None),
                             ("test accuracy", test.get("accuracy"), test.get("accuracy_ci")),
                             ("test macro-F1", test.get("macro_f1"), test.get("macro_f1_ci")),
                             ("val accuracy", val.get("accuracy"), val.get("accuracy_ci")),
                             ("test images", test.get("n"), None)):
        if value is not None:
            span = f"<small>95%: {ci[0]:.3f}–{ci[1]:.3f}</small>" if ci else ""
            cards.append(f'<div class="card">{html.escape(label)}<b>{_fmt(value, 3)}</b>{span}</div>')
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>",
             f"<style>{REPORT_CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1><p class='sub'>transferlab report</p>",
             f"<div class='cards'>{''.join(cards)}</div>"]
    for w in warnings:
        parts.append(f"<p class='warn'>{html.escape(w)}</p>")
    parts.append("<h2>Summary</h2>")
    parts.append(_table(["item", "value"], [[k, v] for k, v in summary.items()]))
    if counts:
        splits = [s for s in ("train", "val", "test", "all") if any(s in c for c in counts.values())]
        rows = [[name, *(c.get(s, 0) for s in splits), sum(c.values())] for name, c in counts.items()]
        rows.append(["total", *(sum(c.get(s, 0) for c in counts.values()) for s in splits),
                     sum(sum(c.values()) for c in counts.values())])
        parts.append("<h2>Data</h2>" + _table(["class", *splits, "total"], rows))
        parts.append(f"<p>{len(skipped)} file(s) skipped" + (" (see skipped.csv)." if skipped else ".") + "</p>")
        if skipped:
            parts.append(_table(["skipped file", "reason"], [[p, r] for p, r in list(skipped)[:20]]))
    for split_name, split in (("Test", test), ("Validation", val)):
        if not split or not split.get("per_class"):
            continue
        parts.append(f"<h2>{split_name} metrics</h2>")
        topk = ", ".join(f"top-{k}: {_fmt(v, 3)}" for k, v in split.get("top_k_accuracy", {}).items())
        parts.append(f"<p>accuracy {with_ci(split.get('accuracy'), split.get('accuracy_ci'), 4)}, macro-F1 "
                     f"{with_ci(split.get('macro_f1'), split.get('macro_f1_ci'), 4)} (95% intervals)"
                     f"{'; ' + topk if topk else ''}</p>")
        small = too_small_warning(int(split.get("n") or 0), split.get("accuracy")) if split is test else None
        if small:
            parts.append(f"<p class='warn'>{html.escape(small)}</p>")
        parts.append(_per_class(split))
        if split is test:
            pairs = most_confused(split["confusion_matrix"], split["labels"])
            if pairs:
                parts.append("<h3>Most confused pairs</h3>" +
                             _table(["true", "predicted as", "count"], [list(p) for p in pairs]))
    if "confusion" in images or "confusion_norm" in images:
        parts.append("<h2>Confusion matrix</h2><div class='grid'>")
        for key, alt in (("confusion", "confusion matrix, counts"), ("confusion_norm", "confusion matrix, row-normalised")):
            if key in images:
                parts.append(f"<img alt='{alt}' src='{data_uri(images[key])}' style='max-width:49%'>")
        parts.append("</div>")
    if "curves" in images:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{data_uri(images['curves'])}'>")
    for heading, body in extra_sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</main></body></html>")
    return "\n".join(parts)
