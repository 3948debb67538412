"""Finding the labelled images of a dataset: class folders, pre-split folders or a CSV manifest.

Every file found is either a usable :class:`Sample` or a :class:`Skipped` entry with its reason;
nothing is dropped silently and no bad file stops the scan.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, ImageError
from .images import ImageInfo, decode, is_image_path
from .labels import check_label

__all__ = ["Sample", "Skipped", "Dataset", "scan", "SPLIT_ALIASES", "TASKS", "LABEL_SEP", "require_single_label"]

log = logging.getLogger("transferlab")

#: Folder names accepted for each split of a pre-split dataset.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
#: ``single`` (one class per image), ``multilabel`` (any number of labels), ``auto`` (from the data).
TASKS = ("auto", "single", "multilabel")
#: Separates the labels of a multi-label image in a manifest and in split.csv (``cat;dog``).
LABEL_SEP = ";"


@dataclass(frozen=True, order=True)
class Sample:
    """One usable image: absolute ``path``, class ``label`` and ``split`` (None until split).

    A multi-label image's ``label`` holds its labels sorted and joined by ``;`` (empty: no label), the
    form a manifest and split.csv use; :attr:`labels` gives them as a tuple."""

    path: str
    label: str
    split: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The image's labels: one for a single-label image, any number (none included) for multi-label."""
        return tuple(self.label.split(LABEL_SEP)) if self.label else ()


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """The result of a scan: usable samples, skipped files, class names in order."""

    root: Path
    samples: list[Sample]
    skipped: list[Skipped]
    classes: list[str]
    layout: str  # "folders", "presplit" or "manifest"
    infos: dict[str, ImageInfo] = field(default_factory=dict, repr=False)
    task: str = "single"  # or "multilabel"

    def split_sizes(self) -> dict[str, int]:
        """Images in each split: ``{"train": n, "val": n, "test": n}``."""
        return {sp: sum(1 for s in self.samples if s.split == sp) for sp in ("train", "val", "test")}

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class and split: ``{label: {split: n}}`` (split ``"all"`` before splitting); a
        multi-label image counts once under each of its labels."""
        out: dict[str, dict[str, int]] = {c: {} for c in self.classes}
        for s in self.samples:
            key = s.split or "all"
            for label in s.labels:
                out[label][key] = out[label].get(key, 0) + 1
        return out


def scan(source: str | os.PathLike[str], validate: bool = True, workers: int = 4, task: str = "auto") -> Dataset:
    """Scan a dataset and validate every image in it.

    ``source`` is a folder of class folders (``DATA/<class>/<image>``), a pre-split folder
    (``DATA/{train,val,test}/<class>/<image>``) or a CSV manifest (``path,label[,split]``, paths
    relative to the manifest). Unreadable files are skipped with a reason.

    ``task``: ``auto`` (default) makes a manifest multi-label when its header says ``labels`` or a row has
    several labels (``cat;dog``); an empty field is then an image with no label. ``multilabel`` also reads
    class folders where one image sits in several folders (the same file content: one image with those
    labels).

    Raises:
        DataError: no such folder, fewer than two classes, or a class with no usable image.

    Example:
        >>> ds = scan("photos/")  # doctest: +SKIP
        >>> ds.classes, len(ds.samples), len(ds.skipped)  # doctest: +SKIP
    """
    if task not in TASKS:
        raise DataError(f"task {task!r}: expected one of {', '.join(TASKS)}.")
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"no such file or folder: '{source}'. Give a folder of class folders, "
                        "a folder with train/val/test folders, or a CSV manifest path,label[,split].")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"'{source}' is a file but not a CSV manifest; expected a folder or a .csv file.")
        candidates, multi = _from_manifest(root, task)
        skipped, layout = [], "manifest"
        root = root.parent.resolve()
    else:
        root = root.resolve()
        split_dirs = _split_dirs(root)
        layout = "presplit" if split_dirs else "folders"
        candidates, skipped = _from_folders(root, split_dirs)
        multi = task == "multilabel"
        if multi:
            candidates = merge_copies(candidates)
    class_names = sorted({label for s in candidates for label in s.labels})
    if len(class_names) < 2:
        found = ", ".join(f"'{c}'" for c in class_names) or "none"
        raise DataError(
            f"need at least two classes in '{source}', found {len(class_names)} ({found}). "
            "Put each class's images in its own sub-folder: DATA/<class>/<image>."
        )
    samples: list[Sample] = []
    infos: dict[str, ImageInfo] = {}
    if validate:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for sample, result in zip(candidates, pool.map(_check, [s.path for s in candidates])):
                if isinstance(result, ImageError):
                    skipped.append(Skipped(sample.path, result.reason))
                else:
                    samples.append(sample)
                    infos[sample.path] = result
    else:
        samples = list(candidates)
    usable = {label for s in samples for label in s.labels}
    empty = [c for c in class_names if c not in usable]
    if empty:
        reasons = [f"{k.path}: {k.reason}" for k in skipped if _label_of(k.path, candidates) in empty][:5]
        detail = ("; skipped files include: " + "; ".join(reasons)) if reasons else ""
        raise DataError(f"class(es) with no usable image: {', '.join(repr(c) for c in empty)} in "
                        f"'{source}'{detail}. Add readable images or remove the folder.")
    return Dataset(root=root, samples=samples, skipped=skipped, classes=class_names, layout=layout,
                   infos=infos, task="multilabel" if multi else "single")


def require_single_label(ds: Dataset, what: str) -> Dataset:
    """``ds`` itself when it is single-label; else a :class:`DataError` saying that ``what`` needs one label
    per image."""
    if ds.task == "multilabel":
        raise DataError(f"{what} works on single-label data (one class per image); '{ds.root}' is multi-label. "
                        "Train it with `transferlab train` (the report has per-label figures).")
    return ds


def _check(path: str) -> ImageInfo | ImageError:
    try:
        return decode(path, draft=64)[1]
    except ImageError as exc:
        return exc


def _label_of(path: str, candidates: list[Sample]) -> str | None:
    for s in candidates:
        if s.path == path:
            return s.labels[0] if s.labels else None
    return None


def merge_copies(samples: list[Sample]) -> list[Sample]:
    """Multi-label class folders: files with the same content (in one split) become one image whose labels
    are the folders it sits in; the first path in sorted order stands for it."""
    from .._io import file_digest

    groups: dict[tuple[str | None, str], list[Sample]] = {}
    for s in samples:
        try:
            key = (s.split, file_digest(s.path))
        except OSError:
            key = (s.split, s.path)  # unreadable: the image check will skip it with its reason
        groups.setdefault(key, []).append(s)
    out = []
    for members in groups.values():
        labels = sorted({m.label for m in members})
        out.append(Sample(min(m.path for m in members), LABEL_SEP.join(labels), members[0].split))
    return sorted(out)


def _split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for child in _listdir(root):
        if child.is_dir() and child.name.lower() in SPLIT_ALIASES:
            found.setdefault(SPLIT_ALIASES[child.name.lower()], child)
    if "train" in found and ({"val", "test"} & found.keys()):
        return found
    return {}


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []


def _from_folders(root: Path, split_dirs: dict[str, Path]) -> tuple[list[Sample], list[Skipped]]:
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    parents = split_dirs.items() if split_dirs else [(None, root)]
    for split, parent in parents:
        for child in _listdir(parent):
            if child.is_dir() and not child.name.startswith("."):
                _walk_class(child, child.name, split, samples, skipped)
            elif child.is_file():
                skipped.append(Skipped(str(child), "not inside a class folder"))
    return samples, skipped


def _walk_class(folder: Path, label: str, split: str | None, samples: list[Sample],
                skipped: list[Skipped]) -> None:
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=None):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError as exc:
            skipped.append(Skipped(dirpath, f"folder not readable: {exc.strerror}"))
            dirnames[:] = []
            continue
        if key in seen:  # a symlink loop
            skipped.append(Skipped(dirpath, "symlink loop: folder already visited"))
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                skipped.append(Skipped(path, "hidden file"))
            elif not is_image_path(name):
                skipped.append(Skipped(path, f"not an image file (extension '{Path(name).suffix}')"))
            else:
                samples.append(Sample(os.path.abspath(path), label, split))


def _from_manifest(manifest: Path, task: str = "auto") -> tuple[list[Sample], bool]:
    """The manifest's samples and whether it is multi-label."""
    base = manifest.parent.resolve()
    samples: list[Sample] = []
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not data
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"manifest '{manifest}' is empty; expected rows path,label[,split].")
    header = [c.strip().lower() for c in rows[0]]
    if header[:1] == ["path"] and len(header) > 1 and header[1] in ("label", "labels"):
        rows = rows[1:]
    # an empty label is "no label" only where the manifest is multi-label; in a single-label one it is an error
    multi = task == "multilabel" or (task == "auto" and (
        header[1:2] == ["labels"] or any(len(r) > 1 and LABEL_SEP in r[1] for r in rows)))
    for i, row in enumerate(rows, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DataError(f"manifest '{manifest}' line {i}: expected path,label[,split], got {row!r}")
        path = Path(row[0].strip())
        if not path.is_absolute():
            path = base / path
        split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else None
        if split is not None and split not in SPLIT_ALIASES:
            raise DataError(f"manifest '{manifest}' line {i}: unknown split {row[2]!r}; "
                            "expected train, val or test.")
        where = f"manifest '{manifest}' line {i}"
        if multi:
            label = LABEL_SEP.join(sorted({check_label(x.strip(), where) for x in row[1].split(LABEL_SEP)
                                           if x.strip()}))
        else:
            label = check_label(row[1], where)
        samples.append(Sample(str(path), label, SPLIT_ALIASES[split] if split else None))
    return samples, multi
