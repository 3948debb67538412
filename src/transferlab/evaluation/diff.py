"""``transferlab diff RUN_A RUN_B``: which test images changed between two runs on the same split.

Reads each run's ``predictions.csv`` (written by ``train`` and ``evaluate``), pairs the images by path,
and reports the images ``B`` fixed and broke, per-class recall with the paired difference and its 95%
interval, and McNemar's exact test on the whole split.
"""

from __future__ import annotations

import csv
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_json, write_text
from ..errors import DataError
from .pages import thumbnail_page
from .stats import as_list as _ci, mcnemar, paired_difference_interval, wilson_interval

__all__ = ["RunDiff", "diff_runs", "read_predictions", "write_diff"]


@dataclass
class RunDiff:
    """The comparison of two runs on their common test images."""

    run_a: str
    run_b: str
    n_common: int
    only_in_a: int
    only_in_b: int
    accuracy_a: float
    accuracy_b: float
    difference_ci: list[float] | None
    mcnemar: dict[str, Any]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``diff.json``)."""
        return dict(self.__dict__)


def read_predictions(run: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{path: {"true", "pred", "prob"}}`` from a run directory (or its ``predictions.csv``)."""
    path = Path(run)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise DataError(f"'{run}' has no predictions.csv: give a run directory written by `transferlab train` "
                        "or `transferlab evaluate`.")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "true_labels" in rows[0]:
        raise DataError(f"{path} is a multi-label run's: diff compares single-label runs image by image; compare "
                        "multi-label runs by their per-label figures in metrics.json.")
    if rows and not {"path", "true_label", "predicted_label", "probability"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns path,true_label,predicted_label,probability.")
    return {r["path"]: {"true": r["true_label"], "pred": r["predicted_label"], "prob": float(r["probability"])}
            for r in rows}


def diff_runs(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str]) -> RunDiff:
    """Compare the test predictions of two runs image by image (see the module docstring).

    Raises:
        DataError: a run has no predictions, the runs share no test image, or an image has two true labels.
    """
    a, b = read_predictions(run_a), read_predictions(run_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise DataError(f"'{run_a}' and '{run_b}' share no test image: diff compares two runs on the same split "
                        "(train the second with the first run's split.csv).")
    bad = [p for p in common if a[p]["true"] != b[p]["true"]]
    if bad:
        raise DataError(f"{len(bad)} image(s) have different true labels in the two runs, e.g. '{bad[0]}'.")
    ca = np.array([a[p]["pred"] == a[p]["true"] for p in common])
    cb = np.array([b[p]["pred"] == b[p]["true"] for p in common])
    truth = np.array([a[p]["true"] for p in common])
    per_class = []
    for label in sorted(set(truth.tolist())):
        m = truth == label
        n = int(m.sum())
        per_class.append({"class": label, "n": n, "recall_a": float(ca[m].mean()), "recall_b": float(cb[m].mean()),
                          "recall_a_ci": _ci(wilson_interval(int(ca[m].sum()), n)),
                          "recall_b_ci": _ci(wilson_interval(int(cb[m].sum()), n)),
                          "delta": float(cb[m].mean() - ca[m].mean()),
                          "delta_ci": _ci(paired_difference_interval(ca[m], cb[m])),
                          "fixed": int(np.sum(~ca[m] & cb[m])), "broken": int(np.sum(ca[m] & ~cb[m]))})
    changed = []
    for p, ra, rb in ((p, a[p], b[p]) for p in common):
        if ra["pred"] == rb["pred"]:
            continue
        kind = "fixed" if rb["pred"] == rb["true"] else "broken" if ra["pred"] == ra["true"] else "changed, still wrong"
        changed.append({"path": p, "true": ra["true"], "pred_a": ra["pred"], "prob_a": ra["prob"],
                        "pred_b": rb["pred"], "prob_b": rb["prob"], "change": kind})
    order = {"broken": 0, "fixed": 1, "changed, still wrong": 2}
    changed.sort(key=lambda r: (order[r["change"]], r["true"], r["path"]))
    return RunDiff(str(run_a), str(run_b), len(common), len(set(a) - set(b)), len(set(b) - set(a)),
                   float(ca.mean()), float(cb.mean()), _ci(paired_difference_interval(ca, cb)), mcnemar(ca, cb),
                   per_class, changed)


def write_diff(d: RunDiff, out: str | os.PathLike[str], max_images: int = 300) -> Path:
    """Write ``diff.json``, ``diff.csv`` (the changed images) and ``diff.html`` (per-class table and the
    changed images as thumbnails, at most ``max_images`` per group) into ``out``; returns the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diff.json", d.to_dict())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "predicted_a", "probability_a", "predicted_b", "probability_b", "change"])
    w.writerows([r["path"], r["true"], r["pred_a"], f"{r['prob_a']:.4f}", r["pred_b"], f"{r['prob_b']:.4f}",
                 r["change"]] for r in d.changed)
    write_text(out / "diff.csv", buf.getvalue())
    ci = d.difference_ci
    intro = (f"<p class='sub'>A: {html.escape(d.run_a)}<br>B: {html.escape(d.run_b)}</p>"
             f"<p>{d.n_common} common test images. Accuracy A {d.accuracy_a:.4f}, B {d.accuracy_b:.4f}; "
             f"B − A = {100 * (d.accuracy_b - d.accuracy_a):+.2f} points"
             + (f" (95% {100 * ci[0]:+.2f} to {100 * ci[1]:+.2f})" if ci else "")
             + f". McNemar's exact test: p = {d.mcnemar['p_value']:.3g} ({d.mcnemar['only_b_right']} image(s) only B "
             f"gets right, {d.mcnemar['only_a_right']} only A).</p>")
    if d.only_in_a or d.only_in_b:
        intro += (f"<p class='warn'>The runs' test splits differ: {d.only_in_a} image(s) only in A, "
                  f"{d.only_in_b} only in B (left out).</p>")
    rows = "".join(
        f"<tr><td>{html.escape(c['class'])}</td><td>{c['n']}</td><td>{c['recall_a']:.3f}</td><td>{c['recall_b']:.3f}</td>"
        f"<td>{100 * c['delta']:+.1f}" + (f" ({100 * c['delta_ci'][0]:+.1f} to {100 * c['delta_ci'][1]:+.1f})"
                                          if c["delta_ci"] else "") +
        f"</td><td>{c['fixed']}</td><td>{c['broken']}</td></tr>" for c in d.per_class)
    intro += ("<h2>Per class</h2><table><thead><tr><th>class</th><th>images</th><th>recall A</th><th>recall B</th>"
              "<th>B − A, points (95%)</th><th>fixed</th><th>broken</th></tr></thead>"
              f"<tbody>{rows}</tbody></table>")
    groups = []
    for kind in ("broken", "fixed", "changed, still wrong"):
        items = [(r["path"], f"{Path(r['path']).name}\ntrue {r['true']}\nA: {r['pred_a']} ({r['prob_a']:.2f})\n"
                  f"B: {r['pred_b']} ({r['prob_b']:.2f})") for r in d.changed if r["change"] == kind]
        groups.append((f"{kind} by B", items[:max_images]))
    page = out / "diff.html"
    write_text(page, thumbnail_page("transferlab diff", intro, groups))
    return page
