"""The fine-tuning data as a :class:`~lightning.pytorch.LightningDataModule`: the training images with their
seeded augmentation and sampler, and the validation images, each decoded in worker processes.

Kept apart from the model code (Lightning's split between the module and the data): the Trainer asks it
for its loaders, and a resumed run rebuilds the same order and augmentations from ``(seed, epoch)``.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data.loader import ImageFiles, collate_images, worker_init
from ..data.transforms import EvalTransform, Preprocessing, TrainTransform
from ..runtime import seed_cpu

__all__ = ["FinetuneData", "EpochSeededSampler", "TrainFiles"]

#: Validation batches are only forward passes, so they can be larger than training batches.
VAL_BATCH = 64


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)`` and encodes the epoch in each index, so a
    resumed run sees the same order and the same augmentations as an uninterrupted one. With ``weights``,
    draws with replacement in proportion to them (``--balance sampler``)."""

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), self.n, True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        base = self.epoch * self.n
        return iter((base + order).tolist())


class TrainFiles(ImageFiles):
    """Training items: the epoch comes encoded in the index; augmentation is seeded per (seed, epoch, file)."""

    def __init__(self, paths, transform, labels, seed: int) -> None:
        super().__init__(paths, transform, labels)
        self.seed = seed

    def __getitem__(self, i: int):
        n = len(self.paths)
        epoch, j = divmod(int(i), n)
        seed_cpu(zlib.crc32(f"{self.seed}:{epoch}:{self.paths[j]}".encode()))
        return super().__getitem__(j)


def _collate_xy(items):
    x, _, y, _ = collate_images(items)  # files that failed to decode are left out of the batch
    return x, y


class FinetuneData(L.LightningDataModule):
    """Training and validation images for fine-tuning.

    ``labels``: class indices, or 0/1 rows for multi-label. ``augment``: the :class:`TrainTransform` preset.
    ``balance_sampler``: draw the classes evenly (single-label only). ``workers``: decoding processes.
    """

    def __init__(self, pre: Preprocessing, train_paths: Sequence[str], train_labels: Sequence[Any],
                 val_paths: Sequence[str], val_labels: Sequence[Any], *, batch_size: int, augment: str, seed: int,
                 workers: int, balance_sampler: bool = False) -> None:
        super().__init__()
        self.batch_size, self.workers = batch_size, workers
        y = np.asarray(train_labels, dtype=np.int64)
        self.train_set = TrainFiles(list(train_paths), TrainTransform(pre, augment), y.tolist(), seed)
        weights = 1.0 / np.bincount(y).astype(np.float64)[y] if balance_sampler else None
        self.sampler = EpochSeededSampler(len(self.train_set), seed, weights)
        self.val_set = ImageFiles(list(val_paths), EvalTransform(pre),
                                                 np.asarray(val_labels, dtype=np.int64).tolist()) if len(val_paths) else None

    @property
    def has_val(self) -> bool:
        """True when there are validation images."""
        return self.val_set is not None

    @property
    def drop_last(self) -> bool:
        """A last, smaller batch is dropped once there is more than one batch (its noisy step is not worth it)."""
        return len(self.train_set) > self.batch_size

    def train_batches(self) -> int:
        """Batches in one training epoch (on one process)."""
        n, b = len(self.train_set), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def _loader_kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_workers": self.workers, "persistent_workers": False, "collate_fn": _collate_xy,
                              "worker_init_fn": worker_init if self.workers else None}
        if self.workers:
            kw["prefetch_factor"] = 4
        return kw

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler, drop_last=self.drop_last,
                          **self._loader_kw())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=VAL_BATCH, shuffle=False, **self._loader_kw())
