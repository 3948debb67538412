"""``transferlab data issues``, ``data curve``, ``data check`` and ``lr-find``: scan and split a dataset, get
its cached features, and run a diagnostic on them."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .._io import write_json
from ..backbones.models import create_backbone
from ..config import DEFAULT_BACKBONE
from ..data.scan import Dataset, Sample, Skipped, require_single_label, scan
from ..data.split import split_dataset
from ..errors import DataError
from ..evaluation.plots import lr_find_png
from ..features.cache import FeatureCache
from ..features.extract import FeatureExtractor
from ..training.lr_find import LRFindResult, lr_find_head
from ..training.plan import native_size, useful_size
from .curve import LearningCurve, learning_curve
from .label_issues import LabelIssues, find_label_issues
from .outputs import write_issue_outputs

__all__ = ["DatasetFeatures", "dataset_features", "data_issues", "data_curve", "check_dataset", "lr_find"]

log = logging.getLogger("transferlab")


@dataclass
class DatasetFeatures:
    """A split dataset's usable samples with their feature rows (files that failed are left out)."""

    dataset: Dataset
    samples: list[Sample]
    features: np.ndarray
    image_size: int
    seconds: float

    def split(self, name: str) -> tuple[list[Sample], np.ndarray, np.ndarray]:
        """Samples, features and class indices of one split."""
        idx = [i for i, s in enumerate(self.samples) if s.split == name]
        index = {c: i for i, c in enumerate(self.dataset.classes)}
        return ([self.samples[i] for i in idx], self.features[idx],
                np.array([index[self.samples[i].label] for i in idx], dtype=np.int64))


def dataset_features(data: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE, seed: int = 0,
                     cache_dir: str | None = None, quiet: bool = False) -> DatasetFeatures:
    """Scan and split ``data`` as ``train`` does (same seed, same split) and extract its features through
    the frozen backbone at the size ``train`` would choose without a time limit (cached, so a later
    ``train`` reuses them)."""
    ds = split_dataset(require_single_label(scan(data), "this diagnosis"), seed=seed)
    bb, info = create_backbone(backbone)
    size = useful_size(native_size(ds.infos), info.preprocessing.size)
    info = replace(info, preprocessing=replace(info.preprocessing, size=size))  # as train sets its planned size
    t0 = time.perf_counter()
    ext = FeatureExtractor(bb, info, quiet=quiet).extract([s.path for s in ds.samples], FeatureCache(cache_dir))
    keep = [s for s, ok in zip(ds.samples, ext.ok) if ok]
    return DatasetFeatures(ds, keep, ext.features[ext.ok], size, time.perf_counter() - t0)


def data_issues(data: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE,
                seed: int = 0, folds: int = 5, cache_dir: str | None = None, quiet: bool = False) -> LabelIssues:
    """Search every labelled image of ``data`` (all splits) for suspect labels, outliers and conflicting
    near-duplicates; write ``label_issues.csv`` and ``label_issues.html`` into ``out``."""
    df = dataset_features(data, backbone=backbone, seed=seed, cache_dir=cache_dir, quiet=quiet)
    issues = find_label_issues(df.samples, df.features, df.dataset.classes, folds=folds, seed=seed)
    write_issue_outputs(issues, out, data=str(data))
    return issues


def data_curve(data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               backbone: str = DEFAULT_BACKBONE, seed: int = 0, seeds: int = 3, cache_dir: str | None = None,
               quiet: bool = False) -> LearningCurve:
    """The learning curve of the probe head on ``data``'s training split, scored on its validation split
    (the test split when there is no validation split); writes ``learning_curve.png`` and
    ``learning_curve.json`` into ``out`` when given."""
    df = dataset_features(data, backbone=backbone, seed=seed, cache_dir=cache_dir, quiet=quiet)
    _, xtr, ytr = df.split("train")
    _, xev, yev = df.split("val")
    scored_on = "val"
    if not len(yev):
        _, xev, yev = df.split("test")
        scored_on = "test"
    if not len(yev):
        raise DataError(f"'{data}' has no validation or test images to score the learning curve on.")
    curve = learning_curve(xtr, ytr, xev, yev, df.dataset.classes, seed=seed, seeds=seeds, scored_on=scored_on)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "learning_curve.png").write_bytes(curve.png())
        write_json(out / "learning_curve.json", curve.to_dict())
    return curve


def lr_find(data: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str = DEFAULT_BACKBONE,
            seed: int = 0, quiet: bool = False, cache_dir: str | None = None) -> LRFindResult:
    """Run the learning-rate finder for the head on ``data``'s training split; writes ``out/lr_find.png``."""
    ds = split_dataset(require_single_label(scan(data), "lr-find"), seed=seed)
    bb, info = create_backbone(backbone)
    train = [s for s in ds.samples if s.split == "train"]
    ext = FeatureExtractor(bb, info, quiet=quiet).extract([s.path for s in train], FeatureCache(cache_dir))
    index = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([index[s.label] for s in train], dtype=np.int64)[ext.ok]
    res = lr_find_head(ext.features[ext.ok], y, len(ds.classes), seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.png").write_bytes(lr_find_png(res.lrs, res.losses, res.suggestion))
    return res


def check_dataset(data: str | os.PathLike[str], *, near: bool = True, backbone: str = DEFAULT_BACKBONE,
                  threshold: float = 0.97, seed: int = 0, cache_dir: str | None = None, quiet: bool = False):
    """Audit ``data`` (see :func:`transferlab.data.audit.audit`); near-duplicates use cached features."""
    from ..data.audit import audit

    ds = split_dataset(scan(data), seed=seed)
    feats = None
    if near and ds.samples:
        bb, info = create_backbone(backbone)
        ext = FeatureExtractor(bb, info, quiet=quiet).extract([s.path for s in ds.samples], FeatureCache(cache_dir))
        feats = ext.features
        for i, reason in ext.errors.items():
            ds.skipped.append(Skipped(ds.samples[i].path, reason))
    return audit(ds, feats, threshold)
