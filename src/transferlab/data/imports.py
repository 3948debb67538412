"""Importing datasets into class folders: CIFAR-10/100 python archives, MNIST/Fashion-MNIST IDX files
and CSV manifests.

The CIFAR "python version" batches are pickles. They are read with a restricted unpickler that only
rebuilds plain containers and numpy arrays, so a doctored archive cannot run code.
"""

from __future__ import annotations

import gzip
import hashlib
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
from .labels import check_label, inside
from .scan import scan

__all__ = ["import_cifar", "import_idx", "read_idx", "import_manifest", "CIFAR_URLS", "IDX_CLASSES"]

CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
#: The MD5 sums published with the archives (as torchvision checks them).
CIFAR_MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}

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

    from .._io import transferlab_home

    dest = transferlab_home() / "downloads" / Path(CIFAR_URLS[kind]).name
    if not dest.exists():
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(CIFAR_URLS[kind], tmp)  # noqa: S310 (fixed https address)
            got = hashlib.md5(tmp.read_bytes(), usedforsecurity=False).hexdigest()
            if got != CIFAR_MD5[kind]:
                raise DataError(f"the downloaded {kind} archive has MD5 {got}, not the published "
                                f"{CIFAR_MD5[kind]}; it was not kept.")
    return dest


#: Largest archive member read into memory: CIFAR-100's train batch is about 155 MB.
MAX_MEMBER_BYTES = 512 * 1024 * 1024


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of one member, refused before reading when its declared size is over the bound, and cut
    off at the bound when the stream holds more than it declared (a gzip bomb)."""
    if member.size > MAX_MEMBER_BYTES:
        raise DataError(f"archive member {member.name!r} is {member.size} bytes; over the limit of {MAX_MEMBER_BYTES}")
    f = tar.extractfile(member)
    if f is None:
        raise DataError(f"archive member {member.name!r} is not a regular file")
    data = f.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise DataError(f"archive member {member.name!r} is over the limit of {MAX_MEMBER_BYTES} bytes")
    return data


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
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_batch(_read_member(tar, members[meta_name]))[label_key]]
    names = [check_label(n, f"'{archive}' {meta_name}, class {i}") for i, n in enumerate(names)]
    batches = {"train": sorted(n for n in members if n.startswith("data_batch")) if kind == "cifar10" else ["train"],
               "test": ["test_batch"] if kind == "cifar10" else ["test"]}
    out = Path(out)
    counts = {}
    for split, files in batches.items():
        n = 0
        for fname in files:
            if fname not in members:
                raise DataError(f"'{archive}' lacks {fname}")
            batch = _load_batch(_read_member(tar, members[fname]))
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64).reshape(-1)
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"'{archive}' {fname} is not a CIFAR batch: {exc}") from None
            bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
            if len(bad) or len(labels) != len(data):
                raise DataError(f"'{archive}' {fname}: {len(labels)} labels for {len(data)} images, labels must be in "
                                f"0..{len(names) - 1}" + (f" (image {bad[0]} has {labels[bad[0]]})" if len(bad) else ""))
            for img, y in zip(data, labels):
                folder = inside(out, split, names[int(y)])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{fname}_{n:05d}.png")
                n += 1
        counts[split] = n
    return counts


IDX_CLASSES = {
    "mnist": [str(d) for d in range(10)],
    # Fashion-MNIST's names, with "/" (not allowed in a folder name) written as "_"
    "fashion-mnist": ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (the MNIST format; gzip-compressed or not) as a numpy array.

    Raises :class:`DataError` naming the file when its header or size does not match the format.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file '{path}': {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"'{path}' is not an IDX file (expected a 0x0000 magic number and a known type code).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"'{path}' is not an IDX file: truncated header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"'{path}' holds {len(data) - header} bytes of data; its header {shape} needs {expected}.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for stem in _IDX_FILES[split]:
        found = [folder / n for n in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                                      stem.replace("-idx", ".idx") + ".gz") if (folder / n).is_file()]
        if not found:
            raise DataError(f"'{folder}' has no {stem}[.gz]: give the folder holding the four IDX files "
                            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...).")
        arrays.append(read_idx(found[0]))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX files in '{folder}' for {split} do not match: images {images.shape}, labels {labels.shape}.")
    return images, labels.astype(np.int64)


def import_idx(kind: str, source: str | os.PathLike[str], out: str | os.PathLike[str], *,
               train_per_class: int | None = None, val_per_class: int = 0, seed: int = 0) -> dict[str, int]:
    """Write MNIST or Fashion-MNIST IDX files as PNG class folders; returns counts per split.

    ``source`` is the folder with the four files (Debian's ``dataset-fashion-mnist`` package puts them in
    ``/usr/share/datasets/fashion-mnist``). Writes ``out/{train,test}/<class>/<n>.png``; with
    ``val_per_class`` or ``train_per_class`` it draws, per class and seeded, a validation split and a
    training subset from the official training set (disjoint) and writes ``out/{train,val,test}``.
    The official test set is always written whole.

    Example:
        >>> import_idx("fashion-mnist", "/usr/share/datasets/fashion-mnist", "fmnist", train_per_class=100,
        ...            val_per_class=20)  # doctest: +SKIP
    """
    if kind not in IDX_CLASSES:
        raise DataError(f"unknown dataset {kind!r}: expected one of {', '.join(IDX_CLASSES)}")
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"'{source}' is not a folder: give the folder holding the {kind} IDX files.")
    if (train_per_class is not None and train_per_class < 1) or val_per_class < 0:
        raise DataError(f"train_per_class={train_per_class}, val_per_class={val_per_class}: expected at least 1 "
                        "training image and 0 or more validation images per class.")
    names = IDX_CLASSES[kind]
    train_x, train_y = _idx_pair(folder, "train")
    test_x, test_y = _idx_pair(folder, "test")
    if max(train_y.max(), test_y.max()) >= len(names) or min(train_y.min(), test_y.min()) < 0:
        raise DataError(f"labels in '{folder}' fall outside 0..{len(names) - 1}: are these {kind} files?")
    picks: dict[str, np.ndarray] = {"train": np.arange(len(train_y))}
    if train_per_class is not None or val_per_class:
        rng = np.random.default_rng(seed)
        tr, va = [], []
        for c in range(len(names)):
            idx = rng.permutation(np.flatnonzero(train_y == c))
            if len(idx) <= val_per_class:
                raise DataError(f"class {names[c]!r} has {len(idx)} training images; cannot hold out {val_per_class}.")
            va.append(idx[:val_per_class])
            tr.append(idx[val_per_class:][:train_per_class])
        picks = {"train": np.sort(np.concatenate(tr)), "val": np.sort(np.concatenate(va))}
    out = Path(out)
    counts: dict[str, int] = {}
    for split, (x, y, idx) in {**{s: (train_x, train_y, i) for s, i in picks.items() if len(i)},
                               "test": (test_x, test_y, np.arange(len(test_y)))}.items():
        for c in range(len(names)):
            inside(out, split, names[c]).mkdir(parents=True, exist_ok=True)
        for i in idx:
            path = out / split / names[int(y[i])] / f"{'test' if split == 'test' else 'train'}_{i:05d}.png"
            if not path.exists():
                with atomic_path(path) as tmp:
                    Image.fromarray(np.ascontiguousarray(x[i], dtype=np.uint8), "L").save(tmp, format="PNG")
        counts[split] = int(len(idx))
    return counts


def import_manifest(manifest: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, int]:
    """Copy the usable images of a ``path,label[,split]`` manifest into class folders (under split folders
    when the manifest has splits); returns counts of copied and skipped files."""
    ds = scan(manifest)
    out = Path(out)
    used: set[Path] = set()
    for s in ds.samples:
        folder = inside(out, s.split, s.label) if s.split else inside(out, s.label)
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / Path(s.path).name
        k = 1
        while dest in used or dest.exists():
            dest = folder / f"{Path(s.path).stem}_{k}{Path(s.path).suffix}"
            k += 1
        used.add(dest)
        shutil.copy2(s.path, dest)
    return {"copied": len(ds.samples), "skipped": len(ds.skipped)}
