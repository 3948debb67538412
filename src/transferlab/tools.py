"""Helpers behind smaller commands (lr-find, data check) that combine the data, feature and training layers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .backbones.models import create_backbone
from .data.scan import Skipped, require_single_label, scan
from .data.split import split_dataset
from .evaluation.plots import lr_find_png
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor
from .training.lr_find import LRFindResult, lr_find_head

__all__ = ["lr_find", "check_dataset"]


def lr_find(data: str | os.PathLike[str], out: str | os.PathLike[str], *, backbone: str = "efficientnet_lite0",
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


def check_dataset(data: str | os.PathLike[str], *, near: bool = True, backbone: str = "efficientnet_lite0",
                  threshold: float = 0.97, seed: int = 0, cache_dir: str | None = None, quiet: bool = False):
    """Audit ``data`` (see :func:`transferlab.data.audit.audit`); near-duplicates use cached features."""
    from .data.audit import audit

    ds = split_dataset(scan(data), seed=seed)
    feats = None
    if near and ds.samples:
        bb, info = create_backbone(backbone)
        ext = FeatureExtractor(bb, info, quiet=quiet).extract([s.path for s in ds.samples], FeatureCache(cache_dir))
        feats = ext.features
        for i, reason in ext.errors.items():
            ds.skipped.append(Skipped(ds.samples[i].path, reason))
    return audit(ds, feats, threshold)
