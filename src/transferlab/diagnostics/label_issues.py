"""Suspected label errors, outliers and conflicting near-duplicates, from cached features.

1. Out-of-sample probabilities: K-fold cross-validated probes (no image is scored by a probe that saw
   it), as confident learning requires (Northcutt, Jiang and Chuang, JAIR 2021), on the features'
   top principal directions (:func:`~transferlab.diagnostics.probe.compress`).
2. Confident learning: each class ``j`` gets the threshold ``t_j``, the mean probability of ``j`` over
   the images labelled ``j``. An image counts as confidently belonging to the classes whose
   probability reaches their threshold; if the most probable of those is not its given label, the
   label is suspect (cleanlab's ``filter_by="confident_learning"``). Suspects are ranked by
   self-confidence, the out-of-sample probability of the given label (lowest first).
3. Outliers: images whose cosine distance to their nearest neighbours is far beyond the rest
   (above Q3 + 3 IQR of every image's distance): far from every class.
4. Near-duplicates that carry different labels (the ``data check`` search).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import write_text
from ..data.audit import near_duplicates
from ..data.scan import Sample
from ..errors import DataError
from .probe import choose_c, compress, fit_predict

__all__ = ["LabelIssues", "find_label_issues", "out_of_sample_probs", "confident_learning", "outlier_scores",
           "ISSUE_FIELDS", "write_issues_csv", "read_issues_csv"]

#: Columns of ``label_issues.csv``; ``accept`` is for the person reviewing (see ``data relabel``).
ISSUE_FIELDS = ("path", "given_label", "suggested_label", "score", "reason", "accept")


def out_of_sample_probs(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
                        c: float | None = None) -> tuple[np.ndarray, float]:
    """Probabilities of every image from a probe that never saw it (stratified K-fold), and the ``C``
    used (chosen on the first fold when not given).

    Raises:
        DataError: a class has fewer than two images (it cannot be held out and learned at once).
    """
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=num_classes)
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if smallest < 2:
        raise DataError("finding label issues needs at least two images in every class "
                        f"(the smallest has {smallest}).")
    k = int(min(folds, smallest))
    probs = np.zeros((len(y), num_classes))
    z = compress(x)[0]  # unsupervised: the labels never enter, so no fold sees another's labels
    splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(z, y))
    if c is None:
        fit_idx, val_idx = splits[0]
        c = choose_c(z[fit_idx], y[fit_idx], z[val_idx], y[val_idx], num_classes, standardize=False)
    for fit_idx, held in splits:
        probs[held] = fit_predict(z[fit_idx], y[fit_idx], z[held], num_classes, c, standardize=False)
    return probs, float(c)


def confident_learning(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(suspect, suggested)``: whether each label is suspect by the per-class thresholds, and the label
    the probabilities suggest instead (the confident class when suspect, else the most probable other)."""
    n, k = probs.shape
    thresholds = np.array([probs[y == j, j].mean() if np.any(y == j) else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -1.0)
    confident = masked.argmax(1)
    has = above.any(1)
    suspect = has & (confident != y)
    others = probs.copy()
    others[np.arange(n), y] = -1.0
    suggested = np.where(suspect, confident, others.argmax(1))
    return suspect, suggested


def outlier_scores(x: np.ndarray, k: int = 5, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(distance, outlier)``: mean cosine distance of each image to its ``k`` nearest neighbours, and
    whether it lies beyond Q3 + 3 IQR of those distances."""
    n = len(x)
    if n <= k + 1:
        return np.zeros(n), np.zeros(n, bool)
    f = np.asarray(x, np.float32)
    f = f - f.mean(0)
    f /= np.clip(np.linalg.norm(f, axis=1, keepdims=True), 1e-12, None)
    dist = np.empty(n)
    for i0 in range(0, n, chunk):
        sim = f[i0:i0 + chunk] @ f.T
        sim[np.arange(len(sim)), np.arange(i0, i0 + len(sim))] = -np.inf  # not its own neighbour
        top = np.partition(sim, -k, axis=1)[:, -k:]
        dist[i0:i0 + chunk] = 1.0 - top.mean(1)
    q1, q3 = np.percentile(dist, [25, 75])
    return dist, dist > q3 + 3 * (q3 - q1)


@dataclass
class LabelIssues:
    """What the search found, over ``samples`` (one row of ``probs`` each).

    ``probs``: out-of-sample probabilities. ``suspect``: label suspected by confident learning.
    ``suggested``: class index suggested. ``outlier``: far from every class. ``rows``: the CSV rows
    (one per flagged file), most suspicious first. ``seconds``: time the search took.
    """

    samples: list[Sample]
    classes: list[str]
    probs: np.ndarray
    suspect: np.ndarray
    suggested: np.ndarray
    outlier: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    c: float = 1.0
    folds: int = 5
    seconds: float = 0.0

    @property
    def self_confidence(self) -> np.ndarray:
        """Out-of-sample probability of each image's given label."""
        y = np.array([self.classes.index(s.label) for s in self.samples])
        return self.probs[np.arange(len(y)), y]

    def ranking(self) -> np.ndarray:
        """Indices of every image, most suspect label first: confident-learning suspects by ascending
        self-confidence, then the rest by ascending self-confidence."""
        sc = self.self_confidence
        return np.lexsort((sc, ~self.suspect))

    def summary(self) -> dict[str, Any]:
        """Counts for metrics.json and the terminal."""
        return {"images": len(self.samples), "suspected_label_errors": int(self.suspect.sum()),
                "outliers": int(self.outlier.sum()),
                "conflicting_near_duplicates": sum(1 for r in self.rows if "near-duplicate" in r["reason"]),
                "rows": len(self.rows), "folds": self.folds, "c": self.c, "seconds": round(self.seconds, 2)}


def find_label_issues(samples: Sequence[Sample], features: np.ndarray, classes: Sequence[str], *, folds: int = 5,
                      seed: int = 0, c: float | None = None, near_threshold: float = 0.97) -> LabelIssues:
    """Search ``samples`` (with their feature rows) for suspect labels, outliers and near-duplicates that
    disagree on the label. See the module docstring for the method.

    Example:
        >>> issues = find_label_issues(samples, feats, classes)  # doctest: +SKIP
        >>> issues.rows[0]["path"], issues.rows[0]["suggested_label"]  # doctest: +SKIP
    """
    import time

    t0 = time.perf_counter()
    samples, classes = list(samples), list(classes)
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[s.label] for s in samples], dtype=np.int64)
    x = np.asarray(features, np.float32)
    probs, c = out_of_sample_probs(x, y, len(classes), folds, seed, c)
    suspect, suggested = confident_learning(probs, y)
    dist, outlier = outlier_scores(x)
    found: dict[int, dict[str, Any]] = {}
    for i in np.flatnonzero(suspect):
        found[int(i)] = {"score": 1.0 - probs[i, y[i]], "suggested": classes[suggested[i]],
                         "reasons": [f"label: p(given)={probs[i, y[i]]:.3f}, p(suggested)={probs[i, suggested[i]]:.3f}"]}
    if outlier.any():
        rank = dist.argsort().argsort() / max(1, len(dist) - 1)
        for i in np.flatnonzero(outlier):
            row = found.setdefault(int(i), {"score": 0.0, "suggested": "", "reasons": []})
            row["score"] = max(row["score"], float(rank[i]))
            row["reasons"].append(f"outlier: far from every class (neighbour distance {dist[i]:.3f})")
    pos = {s.path: i for i, s in enumerate(samples)}
    for pair in near_duplicates(samples, x, near_threshold):
        if "classes" not in pair["kind"]:
            continue
        a, b = (f["path"] for f in pair["files"])
        for me, other in ((a, b), (b, a)):
            i, j = pos[me], pos[other]
            row = found.setdefault(i, {"score": 0.0, "suggested": "", "reasons": []})
            row["score"] = max(row["score"], float(pair["similarity"]))
            row["reasons"].append(f"near-duplicate ({pair['similarity']:.3f}) of {other} labelled {samples[j].label}")
    rows = [{"path": samples[i].path, "given_label": samples[i].label, "suggested_label": r["suggested"],
             "score": round(float(r["score"]), 4), "reason": "; ".join(r["reasons"]), "accept": ""}
            for i, r in found.items()]
    rows.sort(key=lambda r: -r["score"])
    return LabelIssues(samples, classes, probs, suspect, suggested, outlier, rows, c, folds,
                       time.perf_counter() - t0)


def write_issues_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """``label_issues.csv``: :data:`ISSUE_FIELDS`, most suspicious first."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ISSUE_FIELDS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in ISSUE_FIELDS})
    write_text(path, buf.getvalue())


def read_issues_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``label_issues.csv`` (as edited by a person)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such file: '{path}' (give the label_issues.csv that `transferlab data issues` wrote).")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"path", "given_label", "suggested_label"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected {','.join(ISSUE_FIELDS)}.")
        return list(reader)
