"""Files and report sections of the diagnostics: ``label_issues.csv``/``.html`` and the learning curve."""

from __future__ import annotations

import html
import os
from pathlib import Path

from .._io import write_text
from ..evaluation.pages import thumbnail_page
from ..evaluation.report import data_uri
from .curve import LearningCurve
from .label_issues import LabelIssues, write_issues_csv

__all__ = ["write_issue_outputs", "issues_section", "curve_section", "MAX_PAGE_IMAGES"]

#: Thumbnails on the label-issues page (the CSV lists every row).
MAX_PAGE_IMAGES = 300


def write_issue_outputs(issues: LabelIssues, out: str | os.PathLike[str], data: str = "") -> tuple[Path, Path]:
    """Write ``label_issues.csv`` (every flagged file) and ``label_issues.html`` (thumbnails, given vs
    suggested label) into ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, page_path = out / "label_issues.csv", out / "label_issues.html"
    write_issues_csv(issues.rows, csv_path)
    s = issues.summary()
    intro = (f"<p class='sub'>{html.escape(data)}</p><p>{s['images']} images searched with {s['folds']}-fold "
             f"cross-validated probe heads (C={s['c']:g}) in {s['seconds']:.1f}s: <b>{s['suspected_label_errors']}</b> "
             f"suspected label error(s), <b>{s['outliers']}</b> outlier(s), <b>{s['conflicting_near_duplicates']}"
             "</b> near-duplicate(s) with a different label. Most suspicious first.</p>"
             "<p>To act on them: put <code>yes</code> in the <code>accept</code> column of "
             "<code>label_issues.csv</code> for the files to move to their suggested class, then run "
             "<code>transferlab data relabel DATA label_issues.csv</code> (a dry run) and add <code>--apply</code>. "
             "Nothing is ever deleted.</p>")
    label_rows = [r for r in issues.rows if r["suggested_label"]]
    other_rows = [r for r in issues.rows if not r["suggested_label"]]
    groups = [("Suspected label errors", [(r["path"], _caption(r)) for r in label_rows[:MAX_PAGE_IMAGES]]),
              ("Outliers and conflicting duplicates", [(r["path"], _caption(r)) for r in other_rows[:MAX_PAGE_IMAGES]])]
    write_text(page_path, thumbnail_page("transferlab: label issues", intro, groups))
    return csv_path, page_path


def _caption(row: dict) -> str:
    name = Path(row["path"]).name
    to = f" → {row['suggested_label']}" if row["suggested_label"] else ""
    return f"{name}\ngiven {row['given_label']}{to}\nscore {row['score']:.3f}\n{row['reason'].split(':')[0]}"


def issues_section(issues: LabelIssues, page: str = "label_issues.html", top: int = 10) -> str:
    """The report's "Label issues" section: counts, the top rows and a link to the thumbnail page."""
    s = issues.summary()
    rows = "".join(f"<tr><td>{html.escape(Path(r['path']).name)}</td><td>{html.escape(r['given_label'])}</td>"
                   f"<td>{html.escape(r['suggested_label'])}</td><td>{r['score']:.3f}</td>"
                   f"<td>{html.escape(r['reason'])}</td></tr>" for r in issues.rows[:top])
    table = ("<table><thead><tr><th>file</th><th>given</th><th>suggested</th><th>score</th><th>reason</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>") if rows else ""
    return (f"<p>The training split searched with {s['folds']}-fold cross-validated probe heads on the cached "
            f"features ({s['seconds']:.1f}s): {s['suspected_label_errors']} suspected label error(s), "
            f"{s['outliers']} outlier(s), {s['conflicting_near_duplicates']} near-duplicate(s) with a different "
            f"label. All of them, with thumbnails: <a href='{html.escape(page)}'>{html.escape(page)}</a> "
            "(and label_issues.csv).</p>" + table)


def curve_section(curve: LearningCurve, png: bytes) -> str:
    """The report's "Do I need more data?" section: the plot and its sentences."""
    items = "".join(f"<li>{html.escape(s)}</li>" for s in curve.sentences())
    return (f"<ul>{items}</ul><img alt='learning curve' src='{data_uri(png)}'>"
            f"<p class='sub'>Probe head refitted on 10-100% of the training images ({curve.seeds} seeds per share) in "
            f"{curve.seconds:.1f}s; projections from a power law of the error.</p>")
