"""A training-free classifier: the nearest class prototype (mean feature) on cached features.

With features ``z`` standardised as the head does, the negative squared distance to a prototype
``mu_c`` is ``2 z.mu_c - |mu_c|^2 - |z|^2``; the last term is the same for every class, so the nearest
prototype is a linear layer with weight ``2 mu_c`` and bias ``-|mu_c|^2``. The model is therefore an
ordinary linear head (scaled by ``scale / d`` so that its logits are of order one, ``scale`` chosen on
the validation log-loss): it is saved, predicted, served and exported like any other, and a class is
added or removed by adding or removing one row. Useful from one to twenty images per class
(SimpleShot, Wang et al. 2019, shows nearest-centroid on good features is a strong few-shot baseline).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..backbones.models import build_head

__all__ = ["fit_prototypes", "prototype_row", "PROTOTYPE_SCALES"]

#: Logit scales tried on validation (the prototypes themselves need no fitting).
PROTOTYPE_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def prototype_row(z: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Weight row and bias of one class from its standardised features ``z`` (n, d)."""
    mu = np.asarray(z, np.float64).mean(0)
    d = mu.shape[0]
    return 2.0 * scale * mu / d, float(-scale * (mu @ mu) / d)


def _set_rows(head: nn.Sequential, rows: list[tuple[np.ndarray, float]]) -> None:
    with torch.no_grad():
        head[-1].weight.copy_(torch.from_numpy(np.stack([w for w, _ in rows])).float())
        head[-1].bias.copy_(torch.tensor([b for _, b in rows], dtype=torch.float32))


def fit_prototypes(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   num_classes: int) -> tuple[nn.Sequential, float]:
    """The nearest-prototype head and its logit scale (chosen on validation log-loss; 10 without
    validation images). Every class needs at least one training image."""
    head = build_head(train_x.shape[1], num_classes)
    std = head[0]
    std.set_stats(torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)))
    mean, s = std.mean.numpy().astype(np.float64), float(std.scale)
    z = (np.asarray(train_x, np.float64) - mean) / s
    best, best_loss = 10.0, np.inf
    if len(val_y):
        zv = (np.asarray(val_x, np.float64) - mean) / s
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
