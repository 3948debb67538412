"""A torch Dataset over image paths that never raises on a bad file."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset as TorchDataset

from ..errors import ImageError
from .images import load_image

__all__ = ["ImageFiles", "collate_images", "worker_init"]


def worker_init(_: int) -> None:
    """Decoding workers use one thread each, leaving the cores to the forward pass."""
    torch.set_num_threads(1)


class ImageFiles(TorchDataset):
    """Items are ``(uint8 CHW tensor or None, index, error reason or "")``; a file that fails to
    decode yields ``None`` and its reason instead of stopping the loader."""

    def __init__(self, paths: Sequence[str], transform: Callable, labels: Sequence[int] | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.labels = list(labels) if labels is not None else None
        self.draft = getattr(transform, "draft", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            x = self.transform(load_image(self.paths[i], draft=self.draft))
            err = ""
        except ImageError as exc:
            x, err = None, exc.reason
        y = self.labels[i] if self.labels is not None else -1
        return x, i, y, err


def collate_images(items):
    """Batch the good items; report the indices and reasons of the bad ones."""
    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[3]) for it in items if it[0] is None]
    if good:
        x = torch.stack([it[0] for it in good])
    else:
        x = torch.empty(0, dtype=torch.uint8)
    idx = torch.tensor([it[1] for it in good], dtype=torch.long)
    y = torch.tensor([it[2] for it in good], dtype=torch.long)
    return x, idx, y, bad
