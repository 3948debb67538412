"""``transferlab data relabel``: act on reviewed label issues, never deleting anything.

A person marks rows of ``label_issues.csv`` as accepted (``yes`` in its ``accept`` column, or every row
with ``--all``). For a folder dataset each accepted file moves from its class folder to the suggested
one (``DATA/<class>/...`` or ``DATA/<split>/<class>/...``); a name already taken there gets a suffix.
For a CSV manifest a corrected copy is written beside it and the original is left as it is. Without
``apply`` nothing changes on disk: the moves are only listed (a dry run). Every move made is logged
in ``relabel_log.csv`` (from, to) so it can be undone.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .._io import write_text
from ..errors import DataError
from .labels import check_label, inside
from .scan import SPLIT_ALIASES

__all__ = ["Move", "plan_relabel", "apply_relabel", "ACCEPT_VALUES"]

#: Values of the ``accept`` column that mean yes (case-insensitive).
ACCEPT_VALUES = frozenset({"yes", "y", "true", "1", "x", "accept", "ok"})


@dataclass
class Move:
    """One accepted row: the file, its given and new label, where it goes (``None`` for a manifest row
    or a row that cannot be applied) and ``problem`` when it cannot be applied."""

    path: str
    given: str
    label: str
    dest: Path | None = None
    problem: str = ""


def _accepted(rows: Sequence[dict[str, str]], accept_all: bool) -> list[dict[str, str]]:
    return [r for r in rows if (accept_all and (r.get("suggested_label") or "").strip())
            or (r.get("accept") or "").strip().lower() in ACCEPT_VALUES]


def _class_index(rel: Path, given: str) -> int | None:
    """Position of the class folder in a path relative to the dataset root."""
    parts = rel.parts
    if len(parts) >= 2 and parts[0] == given:
        return 0
    if len(parts) >= 3 and parts[0].lower() in SPLIT_ALIASES and parts[1] == given:
        return 1
    return None


def _free(dest: Path) -> Path:
    """``dest``, or ``name-relabelled-N.ext`` when ``dest`` exists."""
    k = 1
    out = dest
    while out.exists():
        out = dest.with_name(f"{dest.stem}-relabelled-{k}{dest.suffix}")
        k += 1
    return out


def plan_relabel(data: str | os.PathLike[str], rows: Sequence[dict[str, str]], accept_all: bool = False) -> list[Move]:
    """The moves the accepted ``rows`` ask for on ``data`` (a class-folder dataset or a CSV manifest)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"no such file or folder: '{data}'.")
    moves = []
    for r in _accepted(rows, accept_all):
        path, given = r.get("path", ""), r.get("given_label", "")
        new = (r.get("suggested_label") or "").strip()
        m = Move(path, given, new)
        moves.append(m)
        if not new:
            m.problem = "no suggested label (an outlier or duplicate): fix it by hand"
            continue
        try:
            check_label(new, f"label_issues row of {path}")
        except DataError as exc:
            m.problem = str(exc)
            continue
        if new == given:
            m.problem = "suggested label is the given one"
        elif root.is_dir():
            _plan_folder_move(root, m)
    return moves


def _plan_folder_move(root: Path, m: Move) -> None:
    src = Path(m.path)
    try:
        rel = src.resolve().relative_to(root.resolve())
    except ValueError:
        m.problem = f"not inside {root}"
        return
    k = _class_index(rel, m.given)
    if k is None:
        m.problem = f"not in a class folder named '{m.given}'"
        return
    if not src.is_file():
        m.problem = "file not found (already moved?)"
        return
    class_dir = inside(root, *rel.parts[:k], m.label)
    if not class_dir.is_dir():
        m.problem = f"'{m.label}' is not a class folder of {root}"
        return
    m.dest = _free(class_dir.joinpath(*rel.parts[k + 1:]))


def apply_relabel(data: str | os.PathLike[str], moves: Sequence[Move], log_path: str | os.PathLike[str]) -> Path | None:
    """Carry out the applicable ``moves``: move files (folder dataset) or write ``<manifest>.relabelled.csv``
    (returned). Appends each change to ``log_path`` (``from,to,label``)."""
    root = Path(data)
    done: list[tuple[str, str, str]] = []
    written = None
    if root.is_dir():
        for m in moves:
            if m.problem or m.dest is None:
                continue
            m.dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(m.path, m.dest)
            done.append((m.path, str(m.dest), m.label))
    else:
        written = _relabel_manifest(root, [m for m in moves if not m.problem], done)
    if done:
        new_file = not Path(log_path).exists()
        with open(log_path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            if new_file:
                w.writerow(["from", "to", "label"])
            w.writerows(done)
    return written


def _relabel_manifest(manifest: Path, moves: Sequence[Move], done: list[tuple[str, str, str]]) -> Path:
    base = manifest.parent.resolve()
    new_label = {str(Path(m.path).resolve()): m for m in moves}
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    for row in rows:
        if len(row) < 2 or [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        p = Path(row[0].strip())
        key = str((p if p.is_absolute() else base / p).resolve())
        m = new_label.get(key)
        if m is not None and row[1].strip() == m.given:
            row[1] = m.label
            done.append((key, key, m.label))
    out = manifest.with_name(f"{manifest.stem}.relabelled.csv")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text(out, buf.getvalue())
    return out
