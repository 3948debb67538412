"""Stratified, seeded train/val/test splits and the ``split.csv`` / ``skipped.csv`` files."""

from __future__ import annotations

import csv
import io
import logging
import os
import zlib
from dataclasses import replace

import numpy as np

from .._io import write_text
from ..config import TrainConfig
from ..errors import ConfigError
from .scan import Dataset, Sample, Skipped

__all__ = ["SPLITS", "split_dataset", "stratified_split", "iterative_split", "write_split_csv", "read_split_csv",
           "write_skipped_csv"]

log = logging.getLogger("transferlab")

SPLITS = ("train", "val", "test")


def stratified_split(samples: list[Sample], val: float = TrainConfig.val, test: float = TrainConfig.test,
                     seed: int = TrainConfig.seed) -> list[Sample]:
    """Assign ``train``/``val``/``test`` per class, in the given fractions, reproducibly.

    Each class is shuffled with a generator seeded by ``seed`` and the class name, so adding a class
    does not reshuffle the others. A class with three or more images gets at least one image in each
    non-empty split; a class too small to split goes to train (and test when it has two images), with
    a warning that names it.

    Example:
        >>> stratified_split(samples, val=0.15, test=0.15, seed=0)  # doctest: +SKIP
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"split fractions val={val}, test={test}: each must be in [0, 1) and "
                          "their sum below 1 (for example --val 0.15 --test 0.15).")
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: s.path)
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(items))
        n = len(items)
        n_test, n_val = _sizes(n, val, test)
        if n < 3 and (val > 0 or test > 0):
            where = "train and test" if n_test else "train only"
            log.warning("class '%s' has only %d image(s): too small to split into train/val/test, "
                        "so it goes to %s; add images for a fair evaluation.", label, n, where)
        for rank, idx in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            out.append(replace(items[idx], split=split))
    return out


def iterative_split(samples: list[Sample], val: float = TrainConfig.val, test: float = TrainConfig.test,
                    seed: int = TrainConfig.seed) -> list[Sample]:
    """Assign ``train``/``val``/``test`` to multi-label images by iterative stratification (Sechidis,
    Tsoumakas and Vlahavas 2011), reproducibly.

    The rarest label still to place goes first: each of its images goes to the split that most lacks that
    label (ties: the split most short of images, then train, val, test), and the demand is updated. Every
    label with enough images thus lands in each split in about the given fractions, which a random split
    does not promise for rare labels. Images with no label fill the splits last.

    Example:
        >>> iterative_split(samples, val=0.15, test=0.15, seed=0)  # doctest: +SKIP
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"split fractions val={val}, test={test}: each must be in [0, 1) and "
                          "their sum below 1 (for example --val 0.15 --test 0.15).")
    items = sorted(samples, key=lambda s: s.path)
    rng = np.random.default_rng([seed, 7])
    items = [items[i] for i in rng.permutation(len(items))]
    fractions = np.array([1 - val - test, val, test])
    names = sorted({label for s in items for label in s.labels})
    col = {c: j for j, c in enumerate(names)}
    y = np.zeros((len(items), len(names)), dtype=bool)
    for i, s in enumerate(items):
        y[i, [col[c] for c in s.labels]] = True
    want_n = fractions * len(items)  # images each split still wants
    want = fractions[:, None] * y.sum(0)[None, :]  # per split and label
    where = np.full(len(items), -1)
    left = y.copy()
    while left.any():
        counts = left.sum(0)
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for i in np.flatnonzero(left[:, label]):
            lacks = np.where(fractions > 0, want[:, label], -np.inf)
            k = int(np.lexsort((-np.arange(3), want_n, lacks))[-1])  # the last sorts as the most wanting
            where[i] = k
            want[k] -= y[i]
            want_n[k] -= 1
            left[i] = False
    for i in np.flatnonzero(where < 0):
        where[i] = int(np.argmax(np.where(fractions > 0, want_n, -np.inf)))
        want_n[where[i]] -= 1
    return [replace(s, split=SPLITS[k]) for s, k in zip(items, where)]


def _sizes(n: int, val: float, test: float) -> tuple[int, int]:
    if n < 2:
        return 0, 0
    if n == 2:
        return (1 if test > 0 else 0), (1 if test == 0 and val > 0 else 0)
    n_test = max(1, round(n * test)) if test > 0 else 0
    n_val = max(1, round(n * val)) if val > 0 else 0
    while n - n_test - n_val < 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def split_dataset(dataset: Dataset, val: float = TrainConfig.val, test: float = TrainConfig.test,
                  seed: int = TrainConfig.seed) -> Dataset:
    """Return ``dataset`` with every sample assigned to a split.

    Splits already given (pre-split folders, a manifest's split column) are kept. Samples with no
    split are split stratified; when the given splits lack ``val`` or ``test``, that split is carved
    out of ``train`` with the same fractions.
    """
    splitter = iterative_split if dataset.task == "multilabel" else stratified_split
    given = [s for s in dataset.samples if s.split]
    if not given:
        return replace(dataset, samples=_ordered(splitter(dataset.samples, val, test, seed)))
    missing = [s for s in dataset.samples if not s.split]
    if missing:
        log.warning("%d sample(s) have no split; they are split %.0f/%.0f/%.0f.", len(missing),
                    100 * (1 - val - test), 100 * val, 100 * test)
    samples = given + (splitter(missing, val, test, seed) if missing else [])
    present = {s.split for s in samples}
    carve_val = val if "val" not in present else 0.0
    carve_test = test if "test" not in present else 0.0
    if carve_val or carve_test:
        names = " and ".join(n for n, f in (("val", carve_val), ("test", carve_test)) if f)
        log.info("no %s split given: taking it from train (stratified, seed %d).", names, seed)
        train = [s for s in samples if s.split == "train"]
        rest = [s for s in samples if s.split != "train"]
        samples = rest + splitter([replace(s, split=None) for s in train], carve_val, carve_test, seed)
    return replace(dataset, samples=_ordered(samples))


def _ordered(samples: list[Sample]) -> list[Sample]:
    """One canonical order (split, label, path), so a run and its resumption from split.csv agree."""
    order = {name: i for i, name in enumerate(SPLITS)}
    return sorted(samples, key=lambda s: (order.get(s.split or "", 9), s.label, s.path))


def write_split_csv(samples: list[Sample], path: str | os.PathLike[str], task: str = "single") -> None:
    """Write ``path,label,split`` for every sample (atomically); a multi-label dataset's header says
    ``labels`` (``;``-separated), so the file reads back as multi-label. Read it back with
    :func:`read_split_csv` or train on it directly: a split.csv is a manifest."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "labels" if task == "multilabel" else "label", "split"])
    for s in samples:
        w.writerow([s.path, s.label, s.split or ""])
    write_text(path, buf.getvalue())


def read_split_csv(path: str | os.PathLike[str]) -> list[Sample]:
    """Read a ``split.csv`` written by :func:`write_split_csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        return [Sample(r["path"], r.get("label", r.get("labels", "")), r["split"] or None) for r in csv.DictReader(f)]


def write_skipped_csv(skipped: list[Skipped], path: str | os.PathLike[str]) -> None:
    """Write ``path,reason`` for every file that was not used (atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    for k in skipped:
        w.writerow([k.path, k.reason])
    write_text(path, buf.getvalue())
