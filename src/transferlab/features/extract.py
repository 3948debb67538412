"""Streaming feature extraction through the frozen backbone, backed by the feature cache.

Decoding runs in DataLoader workers, overlapped with the forward pass, which runs on the engine
:mod:`transferlab.engines` chooses (PyTorch or ONNX Runtime, whichever is faster on this CPU). Only one
batch of pixels is in memory at a time per worker, whatever the number of images.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import file_digest
from .._progress import progress_bar
from ..backbones.models import BackboneInfo, FeatureBackbone, Normalize
from ..data.loader import ImageFiles, collate_images, worker_init
from ..data.transforms import EvalTransform
from ..distributed import SINGLE, World, all_gather_json, all_gather_rows, owners
from ..engines import Engine, EngineChoice, network_key, open_engine
from ..runtime import pick_device, prepare_model
from .cache import CacheNamespace, FeatureCache

__all__ = ["Extraction", "FeatureExtractor", "default_workers"]


def default_workers() -> int:
    """Decoding worker processes: one per core this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class Extraction:
    """Features for a list of paths; rows whose file failed are zero and ``ok`` is False there."""

    features: np.ndarray
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    per_rank: list[int] = field(default_factory=list)  # images each rank extracted (or read from the cache)
    waited_s: float = 0.0  # of ``seconds``: waiting for decoded batches (decoding is the limit when this is large)
    forward_s: float = 0.0  # of ``seconds``: in the engine's forward passes


class FeatureExtractor:
    """Pooled features of images through a frozen backbone, cached on disk.

    Args:
        backbone: the feature backbone; its weights are not changed.
        info: what :func:`create_backbone` returned alongside it (names, preprocessing, digest).
        device: ``cpu``, ``cuda`` or ``auto`` (default).
        batch_size: images per forward pass. Default: 32 on a CPU, where it measured faster than 64
            (smaller activations stay in cache; BENCHMARKS.md), 128 on an accelerator.
        workers: decoding processes (default: one per core, at most 4; 0 decodes in-process).
        mixed_precision: bf16 autocast on capable CPUs, AMP on CUDA. Default True.
        engine: ``auto`` (default: the faster on this CPU, measured once), ``torch`` or ``onnxruntime``;
            resolved on first use, so a run whose features are all cached measures nothing new.
    """

    def __init__(self, backbone: FeatureBackbone, info: BackboneInfo, *, device: str | None = None,
                 batch_size: int | None = None, workers: int | None = None, mixed_precision: bool = True,
                 quiet: bool = False, engine: str = "auto") -> None:
        self.info = info
        self.device = pick_device(device)
        self.batch_size = batch_size or (32 if self.device.type == "cpu" else 128)
        self.workers = default_workers() if workers is None else workers
        self.mixed_precision = mixed_precision
        self.quiet = quiet
        pre = info.preprocessing
        self.net = prepare_model(nn.Sequential(Normalize(pre.mean, pre.std), backbone).eval(), self.device)
        self.engine_request = engine
        self.key = network_key(info.timm_name, info.cut_stage)
        self._engine: Engine | None = None
        self.choice: EngineChoice | None = None
        self.images_forwarded = 0

    @property
    def engine(self) -> Engine:
        """The engine that runs the backbone (chosen on first use)."""
        if self._engine is None:
            self._open(self.engine_request)
        return self._engine

    def _open(self, engine: str) -> None:
        self._engine, self.choice = open_engine(self.net, self.key, self.info.preprocessing.size, engine=engine,
                                                device=self.device, mixed_precision=self.mixed_precision)

    def description(self, view: str = "eval") -> dict:
        """What identifies these features in the cache: the two engines' features differ in their last digits
        (more where PyTorch runs in bf16), so each engine keeps its own entries."""
        amp = "amp" if self.mixed_precision else "fp32"
        return {"backbone": self.info.timm_name, "weights": self.info.weights_digest,
                "cut_stage": self.info.cut_stage, "preprocessing": self.info.preprocessing.key(),
                "view": view, "precision": amp, "engine": self.engine.name}

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """Features (float32 numpy) of a uint8 NCHW batch."""
        f = self.engine(batch)
        self.images_forwarded += int(batch.shape[0])
        return f.float().cpu().numpy()

    def extract(self, paths: Sequence[str], cache: FeatureCache | None = None, *,
                transform: Callable | None = None, view: str = "eval",
                description: str = "Extracting features", world: World = SINGLE) -> Extraction:
        """Features for ``paths``; cached ones are read, the others computed and cached per batch.

        With several processes (``world``), each extracts its :func:`~transferlab.distributed.share` of
        ``paths`` in batch-sized blocks (the batches one process would have formed, so the features are
        the same) and every process gets the whole matrix."""
        if world.active:
            return self._extract_shared(paths, cache, transform, view, description, world)
        start = time.perf_counter()
        n = len(paths)
        dim = self.info.num_features
        feats = np.zeros((n, dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        errors: dict[int, str] = {}
        ns: CacheNamespace | None = cache.namespace(self.description(view)) if cache is not None else None
        digests: list[str | None] = [""] * n  # content keys, only needed to read and write the cache
        if ns is not None:
            for i, p in enumerate(paths):
                try:
                    digests[i] = file_digest(p)
                except OSError as exc:
                    digests[i] = None
                    errors[i] = f"cannot read file: {exc.strerror or exc}"
            found = ns.get([d for d in digests if d])
            for i, d in enumerate(digests):
                if d and d in found:
                    feats[i] = found[d]
                    ok[i] = True
        todo = [i for i, d in enumerate(digests) if d is not None and not ok[i]]
        cached = int(ok.sum())
        waited = forward = 0.0
        if todo:
            waited, forward = self._compute(paths, todo, digests, feats, ok, errors, ns, transform, description)
        return Extraction(feats, ok, errors, computed=len(todo) - sum(1 for i in todo if i in errors),
                          cached=cached, seconds=time.perf_counter() - start, per_rank=[n], waited_s=waited,
                          forward_s=forward)

    def _extract_shared(self, paths, cache, transform, view, description, world: World) -> Extraction:
        start = time.perf_counter()
        agreed = all_gather_json(world, self.engine.name)[0]  # one engine on every rank: rank 0's
        if agreed != self.engine.name:
            self._open(agreed)
            self.choice.reason = "rank 0's choice"
        shares = owners(len(paths), world, self.batch_size)
        part = self.extract([paths[i] for i in shares[world.rank]], cache, transform=transform, view=view,
                            description=description)
        feats = np.zeros((len(paths), self.info.num_features), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        for rows, f, k in zip(shares, all_gather_rows(world, part.features),
                              all_gather_rows(world, part.ok.astype(np.uint8))):
            feats[rows], ok[rows] = f, k.astype(bool)
        notes = all_gather_json(world, {"errors": {str(i): r for i, r in part.errors.items()},
                                        "computed": part.computed, "cached": part.cached})
        errors = {rows[int(i)]: r for rows, note in zip(shares, notes) for i, r in note["errors"].items()}
        return Extraction(feats, ok, errors, computed=sum(n["computed"] for n in notes),
                          cached=sum(n["cached"] for n in notes), seconds=time.perf_counter() - start,
                          per_rank=[len(s) for s in shares])

    def _compute(self, paths, todo, digests, feats, ok, errors, ns, transform, description) -> tuple[float, float]:
        """Fill ``feats``/``ok``/``errors`` for ``todo``; returns the seconds spent waiting for decoded batches
        and in forward passes."""
        transform = transform or EvalTransform(self.info.preprocessing)
        files = ImageFiles([paths[i] for i in todo], transform)
        workers = self.workers if len(todo) > self.batch_size else 0
        loader = DataLoader(files, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate_images, prefetch_factor=4 if workers else None,
                            persistent_workers=False, worker_init_fn=worker_init if workers else None)
        waited = forward = 0.0
        with progress_bar(description, len(todo), self.quiet) as bar:
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                item = next(batches, None)
                waited += time.perf_counter() - t0
                if item is None:
                    break
                x, idx, _, bad = item
                for j, reason in bad:
                    errors[todo[j]] = reason
                if len(idx):
                    t0 = time.perf_counter()
                    out = self.forward(x)
                    forward += time.perf_counter() - t0
                    rows = [todo[j] for j in idx.tolist()]
                    feats[rows] = out
                    ok[rows] = True
                    if ns is not None:
                        ns.put([digests[r] for r in rows], out)
                bar.advance(len(idx) + len(bad))
        return waited, forward
