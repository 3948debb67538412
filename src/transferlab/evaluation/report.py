"""``report.html``: one self-contained page (plots embedded as data URIs, no external requests)."""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Sequence

from .metrics import most_confused

__all__ = ["render_report", "data_uri"]

_CSS = """
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


def _per_class(split: dict[str, Any]) -> str:
    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in split["per_class"].items()]
    if rows:
        n = sum(r[4] for r in rows) or 1
        rows.append(["macro avg", *(sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3)), n])
        rows.append(["weighted avg", *(sum(r[i] * r[4] for r in rows[:-1]) / n for i in (1, 2, 3)), n])
    return _table(["class", "precision", "recall", "F1", "support"], rows)


def render_report(*, title: str, metrics: dict[str, Any], images: dict[str, bytes],
                  summary: dict[str, Any], counts: dict[str, dict[str, int]] | None = None,
                  skipped: Sequence[tuple[str, str]] = (), warnings: Sequence[str] = (),
                  extra_sections: Sequence[tuple[str, str]] = ()) -> str:
    """The report page. ``images`` maps names (``curves``, ``confusion``, ``confusion_norm``) to PNG bytes;
    ``extra_sections`` are (heading, HTML) pairs appended in order."""
    test = metrics.get("test") or {}
    val = metrics.get("val") or {}
    cards = []
    for label, value in (("test accuracy", test.get("accuracy")), ("test macro-F1", test.get("macro_f1")),
                         ("val accuracy", val.get("accuracy")), ("test images", test.get("n"))):
        if value is not None:
            cards.append(f'<div class="card">{html.escape(label)}<b>{_fmt(value, 3)}</b></div>')
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>",
             f"<style>{_CSS}</style></head><body><main>",
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
        parts.append(f"<p>accuracy {_fmt(split.get('accuracy'), 4)}, macro-F1 {_fmt(split.get('macro_f1'), 4)}"
                     f"{'; ' + topk if topk else ''}</p>")
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
