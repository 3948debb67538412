"""Importing datasets into class folders: CIFAR-10/100 python archives and CSV manifests.

The CIFAR "python version" batches are pickles. They are read with a restricted unpickler that only
rebuilds plain containers and numpy arrays, so a doctored archive cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._io import atomic_path
from ..errors import DataError
from .scan import scan

__all__ = ["import_cifar", "import_manifest", "CIFAR_URLS"]

CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR batch: only arrays and plain data are allowed")


def _load_batch(data: bytes) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError("not a CIFAR python batch: expected a dictionary")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _fetch(kind: str, source: str | None, allow_download: bool) -> Path:
    if source and Path(source).exists():
        return Path(source)
    if not allow_download:
        raise DataError(f"'{source}' does not exist. Give the local {kind} archive (cifar-*-python.tar.gz), or "
                        f"allow the download of {CIFAR_URLS[kind]} with --allow-download.")
    import urllib.request

    from ..backbones.weights import transferlab_home

    dest = transferlab_home() / "downloads" / Path(CIFAR_URLS[kind]).name
    if not dest.exists():
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(CIFAR_URLS[kind], tmp)  # noqa: S310 (fixed https address)
    return dest


def import_cifar(kind: str, source: str | None, out: str | os.PathLike[str], allow_download: bool = False) -> dict[str, int]:
    """Write a CIFAR-10/100 python archive as ``out/{train,test}/<class>/<n>.png``; returns counts per split."""
    if kind not in CIFAR_URLS:
        raise DataError(f"unknown dataset {kind!r}: expected cifar10 or cifar100")
    archive = _fetch(kind, source, allow_download)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot open '{archive}' as a tar archive: {exc}") from None
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    meta_name, label_key = ("batches.meta", "label_names") if kind == "cifar10" else ("meta", "fine_label_names")
    if meta_name not in members:
        raise DataError(f"'{archive}' has no {meta_name}: is it the {kind} python archive?")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_batch(tar.extractfile(members[meta_name]).read())[label_key]]
    batches = {"train": sorted(n for n in members if n.startswith("data_batch")) if kind == "cifar10" else ["train"],
               "test": ["test_batch"] if kind == "cifar10" else ["test"]}
    out = Path(out)
    counts = {}
    for split, files in batches.items():
        n = 0
        for fname in files:
            if fname not in members:
                raise DataError(f"'{archive}' lacks {fname}")
            batch = _load_batch(tar.extractfile(members[fname]).read())
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = batch.get("labels", batch.get("fine_labels"))
            for img, y in zip(data, labels):
                folder = out / split / names[int(y)]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{fname}_{n:05d}.png")
                n += 1
        counts[split] = n
    return counts


def import_manifest(manifest: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, int]:
    """Copy the usable images of a ``path,label[,split]`` manifest into class folders (under split folders
    when the manifest has splits); returns counts of copied and skipped files."""
    ds = scan(manifest)
    out = Path(out)
    used: set[Path] = set()
    for s in ds.samples:
        folder = out / s.split / s.label if s.split else out / s.label
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / Path(s.path).name
        k = 1
        while dest in used or dest.exists():
            dest = folder / f"{Path(s.path).stem}_{k}{Path(s.path).suffix}"
            k += 1
        used.add(dest)
        shutil.copy2(s.path, dest)
    return {"copied": len(ds.samples), "skipped": len(ds.skipped)}
