"""A training-free classifier: the nearest class prototype on cached features.

Features are centred and scaled as the head does, then scaled to unit length, and each class's
prototype is the mean of its images' unit vectors (SimpleShot's "CL2N", Wang et al. 2019: on
Fashion-MNIST at 1, 5 and 20 images per class it beat plain Euclidean prototypes by 1-5 points,
BENCHMARKS.md). The negative squared distance to a prototype ``mu_c`` is ``2 z.mu_c - |mu_c|^2 - |z|^2``
and ``|z| = 1``, so the nearest prototype is a linear layer with weight ``2 mu_c`` and bias
``-|mu_c|^2`` after an :class:`~transferlab.backbones.models.L2Normalize` layer. The model is
therefore an ordinary head (its logits multiplied by a ``scale`` chosen on the validation log-loss): it
is saved, predicted, served and exported like any other, and a class is added or removed by adding or
removing one row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..backbones.models import build_head

__all__ = ["fit_prototypes", "prototype_row", "unit_rows", "PROTOTYPE_SCALES"]

#: Logit scales tried on validation (the prototypes themselves need no fitting).
PROTOTYPE_SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def unit_rows(x: np.ndarray, mean: np.ndarray, scale: float) -> np.ndarray:
    """Features standardised with ``mean``/``scale`` and scaled to unit length, as the head does."""
    z = (np.asarray(x, np.float64) - mean) / scale
    return z / np.clip(np.linalg.norm(z, axis=1, keepdims=True), 1e-12, None)


def prototype_row(z: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Weight row and bias of one class from its images' unit feature vectors ``z`` (n, d)."""
    mu = np.asarray(z, np.float64).mean(0)
    return 2.0 * scale * mu, float(-scale * (mu @ mu))


def _set_rows(head: nn.Sequential, rows: list[tuple[np.ndarray, float]]) -> None:
    with torch.no_grad():
        head[-1].weight.copy_(torch.from_numpy(np.stack([w for w, _ in rows])).float())
        head[-1].bias.copy_(torch.tensor([b for _, b in rows], dtype=torch.float32))


def fit_prototypes(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   num_classes: int) -> tuple[nn.Sequential, float]:
    """The nearest-prototype head and its logit scale (chosen on validation log-loss; 10 without
    validation images). Every class needs at least one training image."""
    head = build_head(train_x.shape[1], num_classes, normalize=True)
    std = head[0]
    std.set_stats(torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)))
    mean, s = std.mean.numpy().astype(np.float64), float(std.scale)
    z = unit_rows(train_x, mean, s)
    best, best_loss = 10.0, np.inf
    if len(val_y):
        zv = unit_rows(val_x, mean, s)
        for scale in PROTOTYPE_SCALES:
            rows = [prototype_row(z[train_y == c], scale) for c in range(num_classes)]
            logits = zv @ np.stack([w for w, _ in rows]).T + np.array([b for _, b in rows])
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            loss = float(-logp[np.arange(len(val_y)), val_y].mean())
            if loss < best_loss:
                best, best_loss = scale, loss
    _set_rows(head, [prototype_row(z[train_y == c], best) for c in range(num_classes)])
    return head.eval(), best
