"""Learning-rate range test on cached features (Lightning's ``Tuner.lr_find`` on the head)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, TensorDataset

from ..backbones.models import build_head
from .module import ClassifierModule
from .trainer import make_trainer

__all__ = ["LRFindResult", "lr_find_head"]


@dataclass
class LRFindResult:
    """Learning rates tried, the smoothed loss at each, and the suggested rate (steepest descent)."""

    lrs: list[float]
    losses: list[float]
    suggestion: float | None


def lr_find_head(x: np.ndarray, y: np.ndarray, num_classes: int, *, min_lr: float = 1e-6, max_lr: float = 1.0,
                 num_steps: int = 100, batch_size: int = 64, seed: int = 0) -> LRFindResult:
    """Sweep the learning rate exponentially from ``min_lr`` to ``max_lr`` while training a fresh head."""
    L.seed_everything(seed, verbose=False)
    head = build_head(x.shape[1], num_classes)
    head[0].set_stats(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    module = ClassifierModule(head, lr=1e-3)
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y).long())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    epochs = max(1, int(np.ceil(num_steps / max(1, len(loader)))))
    trainer = make_trainer(None, max_epochs=epochs, callbacks=[], quiet=True, accelerator="cpu", devices=1)
    finder = Tuner(trainer).lr_find(module, train_dataloaders=loader, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_steps, early_stop_threshold=None, update_attr=False)
    res = finder.results
    return LRFindResult([float(v) for v in res["lr"]], [float(v) for v in res["loss"]], finder.suggestion())
