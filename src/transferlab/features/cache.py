"""The on-disk feature cache: pooled backbone features computed once per image.

A namespace is one (backbone, weights digest, cut stage, preprocessing, view) combination; inside it,
features are stored in shards of one batch each, keyed by each file's content digest. Every shard is
written to a temporary name and renamed, so a killed extraction keeps every finished batch, a reader
never sees half a shard, and several processes can fill one cache at once (the ranks of a distributed
run, or two runs: at worst both compute the same image). Each shard carries the SHA-256 of its features;
a shard whose header cannot be read, whose rows do not match its digests or whose features do not match
their checksum (a truncated copy, a damaged disk) is never used: it is removed and its images are
computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._io import atomic_path, write_json
from .._io import transferlab_home

log = logging.getLogger("transferlab")

__all__ = ["FeatureCache", "CacheNamespace", "NamespaceInfo", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$TRANSFERLAB_HOME/cache``."""
    return transferlab_home() / "cache"


@dataclass
class NamespaceInfo:
    """Size of one namespace: its description, number of cached features, bytes on disk."""

    name: str
    description: dict[str, Any]
    entries: int
    bytes: int


class CacheNamespace:
    """The features of one backbone/preprocessing/view combination."""

    def __init__(self, directory: Path, description: dict[str, Any]) -> None:
        self.dir = directory
        self.description = description
        self._index: dict[str, tuple[Path, int]] | None = None
        self.disabled = False  # set when a write failed: the run goes on without caching

    def _ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "namespace.json"
        if not meta.exists():
            write_json(meta, self.description)

    def index(self, refresh: bool = False) -> dict[str, tuple[Path, int]]:
        """Map of content digest -> (shard file, row), read from shard headers only."""
        if self._index is not None and not refresh:
            return self._index
        index: dict[str, tuple[Path, int]] = {}
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        meta = f.metadata() or {}
                except FileNotFoundError:
                    continue
                except Exception as exc:  # noqa: BLE001 - a damaged file: never used, its images recomputed
                    self._discard(shard, str(exc) or type(exc).__name__)
                    continue
                digests = meta.get("digests", "") if meta.get("sha256") else ""  # unverifiable: recomputed
                for row, d in enumerate(digests.split(",") if digests else []):
                    index.setdefault(d, (shard, row))
        self._index = index
        return index

    def __contains__(self, digest: str) -> bool:
        return digest in self.index()

    def get(self, digests: list[str]) -> dict[str, np.ndarray]:
        """Features for the digests that are cached (missing ones are absent from the result)."""
        index = self.index()
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for d in digests:
            if d in index:
                shard, row = index[d]
                by_shard.setdefault(shard, []).append((d, row))
        out: dict[str, np.ndarray] = {}
        for shard, items in by_shard.items():
            feats = self._read(shard)
            if feats is None:
                continue
            for d, row in items:
                out[d] = feats[row]
        return out

    def _read(self, shard: Path) -> np.ndarray | None:
        """A shard's features, or ``None`` (and the shard forgotten and removed) when it fails its checks."""
        try:
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                feats = f.get_tensor("features").numpy()
            rows = len(meta.get("digests", "").split(","))
            if feats.ndim != 2 or feats.shape[0] != rows or _checksum(feats) != meta.get("sha256"):
                raise ValueError("its features do not match its checksum")
        except FileNotFoundError:
            reason = "it was removed"
        except Exception as exc:  # noqa: BLE001 - any damage means: do not use it
            reason = str(exc) or type(exc).__name__
        else:
            return feats
        self._discard(shard, reason)
        return None

    def _discard(self, shard: Path, reason: str) -> None:
        """Forget and remove a shard that failed its checks (a writer never leaves one: it renames whole files)."""
        log.warning("feature cache: ignoring damaged shard %s (%s); its images are computed again", shard.name, reason)
        if self._index is not None:
            self._index = {d: v for d, v in self._index.items() if v[0] != shard}
        try:
            shard.unlink()
        except OSError:
            pass

    def put(self, digests: list[str], features: np.ndarray | torch.Tensor) -> None:
        """Store one batch of features as a new shard (atomically)."""
        if not digests or self.disabled:
            return
        t = torch.as_tensor(features, dtype=torch.float32).contiguous()
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        try:
            self._ensure()
            with atomic_path(shard) as tmp:
                save_file({"features": t}, str(tmp), metadata={"digests": ",".join(digests),
                                                               "sha256": _checksum(t.numpy())})
        except OSError as exc:  # the cache is best-effort: a full disk or a read-only folder is not fatal
            self.disabled = True
            log.warning("feature cache disabled for this run: cannot write to '%s' (%s)", self.dir, exc)
            return
        if self._index is not None:
            for row, d in enumerate(digests):
                self._index.setdefault(d, (shard, row))


def _checksum(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).tobytes()).hexdigest()


class FeatureCache:
    """All namespaces under one folder (default ``$TRANSFERLAB_HOME/cache``).

    Example:
        >>> ns = FeatureCache().namespace({"backbone": "tf_efficientnet_lite0", ...})  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def namespace(self, description: dict[str, Any]) -> CacheNamespace:
        """The namespace for ``description`` (a JSON-able dict that identifies the features)."""
        key = json.dumps(description, sort_keys=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        return CacheNamespace(self.root / name, description)

    def info(self) -> list[NamespaceInfo]:
        """Every namespace with its entry count and size."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self._namespaces():
            try:
                desc = json.loads((d / "namespace.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                desc = {}
            ns = CacheNamespace(d, desc)
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append(NamespaceInfo(d.name, desc, len(ns.index()), size))
        return out

    def _namespaces(self) -> list[Path]:
        """The folders this cache wrote: a 16-hex-digit name with its ``namespace.json`` marker. Anything
        else under the root (a user's own folder given as ``--cache-dir``) is not the cache's."""
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.iterdir()
                      if d.is_dir() and not d.is_symlink() and len(d.name) == 16
                      and all(c in "0123456789abcdef" for c in d.name) and (d / "namespace.json").is_file())

    def clear(self) -> int:
        """Delete every cached feature (only the folders the cache wrote); returns the bytes freed."""
        freed = sum(i.bytes for i in self.info())
        for d in self._namespaces():
            shutil.rmtree(d, ignore_errors=True)
        return freed
