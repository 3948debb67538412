"""Dataset audit: what ``transferlab data check`` reports, and the cheap part ``train`` runs.

Exact duplicates are files with the same content digest; near-duplicates are pairs whose backbone
features (from the feature cache) have cosine similarity above a threshold. Both are reported within a
class, across classes (likely label errors) and across splits (leakage that inflates test accuracy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from .._io import file_digest
from .scan import Dataset, Sample, Skipped

__all__ = ["AuditReport", "audit", "exact_duplicates", "near_duplicates", "dedupe_across_splits",
           "SMALL_SIDE"]

log = logging.getLogger("transferlab")

#: Images with a shorter side below this many pixels are reported as very small.
SMALL_SIDE = 32


@dataclass
class AuditReport:
    """Everything the audit found; ``to_dict`` is the JSON report."""

    counts: dict[str, dict[str, int]]
    unreadable: list[dict[str, str]]
    converted: list[dict[str, Any]]
    small: list[dict[str, Any]]
    exact_duplicates: list[dict[str, Any]]
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    imbalance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: getattr(self, k) for k in ("counts", "unreadable", "converted", "small", "exact_duplicates",
                                              "near_duplicates", "imbalance", "warnings")}


def _kind(a: Sample, b: Sample) -> str:
    if a.split and b.split and a.split != b.split:
        return "across splits" if a.label == b.label else "across splits and classes"
    return "within class" if a.label == b.label else "across classes"


def exact_duplicates(samples: list[Sample]) -> list[dict[str, Any]]:
    """Groups of files with identical content: ``{"digest", "kind", "files": [{"path","label","split"}]}``."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        try:
            groups.setdefault(file_digest(s.path), []).append(s)
        except OSError:
            continue
    out = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        kinds = sorted({_kind(a, b) for a, b in combinations(members, 2)})
        out.append({"digest": digest[:16], "kind": ", ".join(kinds),
                    "files": [{"path": m.path, "label": m.label, "split": m.split} for m in members]})
    return out


def near_duplicates(samples: list[Sample], features: np.ndarray, threshold: float = 0.97,
                    exclude_exact: set[frozenset[str]] | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Pairs with cosine similarity of features >= ``threshold`` (exact copies excluded), most similar first."""
    if len(samples) < 2:
        return []
    f = features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)
    pairs = []
    step = 1024
    for i0 in range(0, len(f), step):
        sim = f[i0:i0 + step] @ f.T
        for r, c in zip(*np.nonzero(sim >= threshold)):
            i = i0 + r
            if c <= i:
                continue
            a, b = samples[i], samples[c]
            if exclude_exact and frozenset((a.path, b.path)) in exclude_exact:
                continue
            pairs.append((float(sim[r, c]), a, b))
    pairs.sort(key=lambda t: -t[0])
    return [{"similarity": round(s, 4), "kind": _kind(a, b),
             "files": [{"path": x.path, "label": x.label, "split": x.split} for x in (a, b)]}
            for s, a, b in pairs[:limit]]


def dedupe_across_splits(samples: list[Sample], groups: list[dict[str, Any]]) -> tuple[list[Sample], list[Skipped]]:
    """Drop the val/test copies of files that also appear in an earlier split (train first)."""
    rank = {"train": 0, "val": 1, "test": 2}
    drop: dict[str, str] = {}
    for g in groups:
        files = sorted(g["files"], key=lambda f: (rank.get(f["split"] or "", 3), f["path"]))
        keep = files[0]
        for f in files[1:]:
            if f["split"] != keep["split"]:
                drop[f["path"]] = f"exact duplicate of {keep['path']} ({keep['split']}); removed by --dedupe"
    return [s for s in samples if s.path not in drop], [Skipped(p, r) for p, r in drop.items()]


def audit(ds: Dataset, features: np.ndarray | None = None, near_threshold: float = 0.97) -> AuditReport:
    """Audit a scanned (and usually split) dataset. ``features`` (one row per sample) enables the
    near-duplicate search; without it only the cheap checks run."""
    counts = ds.counts()
    unreadable = [{"path": k.path, "reason": k.reason} for k in ds.skipped]
    converted, small = [], []
    for s in ds.samples:
        info = ds.infos.get(s.path)
        if info is None or not hasattr(info, "conversions"):
            continue
        if info.conversions:
            converted.append({"path": s.path, "conversions": list(info.conversions)})
        if min(info.width, info.height) < SMALL_SIDE:
            small.append({"path": s.path, "size": [info.width, info.height]})
    exact = exact_duplicates(ds.samples)
    near = []
    if features is not None:
        pairs = {frozenset(f["path"] for f in g["files"][i:i + 2]) for g in exact for i in range(len(g["files"]) - 1)}
        near = near_duplicates(ds.samples, features, near_threshold, pairs)
    totals = {c: sum(v.values()) for c, v in counts.items()}
    most, least = max(totals.values() or [0]), min(totals.values() or [0])
    imbalance = {"largest": max(totals, key=totals.get) if totals else None,
                 "smallest": min(totals, key=totals.get) if totals else None,
                 "ratio": round(most / least, 2) if least else None}
    warnings = []
    leaks = [g for g in exact if "across splits" in g["kind"]]
    if leaks:
        warnings.append(f"{len(leaks)} file(s) appear in more than one split (exact duplicates): test accuracy is "
                        "inflated; train with --dedupe to remove the copies from val/test.")
    cross = [g for g in exact if "classes" in g["kind"]]
    if cross:
        warnings.append(f"{len(cross)} identical file(s) carry different labels: likely label errors.")
    near_leaks = [p for p in near if "across splits" in p["kind"]]
    if near_leaks:
        warnings.append(f"{len(near_leaks)} near-duplicate pair(s) across splits (similarity >= {near_threshold}).")
    if imbalance["ratio"] and imbalance["ratio"] >= 3:
        advice = ("each label's threshold is tuned on validation; --balance weights also weighs a label's positives "
                  "by its rarity." if ds.task == "multilabel" else "consider --balance weights or --balance sampler.")
        warnings.append(f"class imbalance: '{imbalance['largest']}' has {imbalance['ratio']}x the images of "
                        f"'{imbalance['smallest']}'; {advice}")
    return AuditReport(counts, unreadable, converted, small, exact, near, imbalance, warnings)
