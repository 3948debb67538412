"""Class names that become folder names: one validator for every importer and for manifests.

A class name is joined into a path (``out/<split>/<class>/``), so a name from an archive or a CSV file
must not be able to leave the folder it is written under (``../../x``, ``/srv/www``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

__all__ = ["check_label", "inside"]


def check_label(label: str, where: str = "") -> str:
    """``label`` itself when it is a safe single folder name; else a :class:`DataError` naming it and
    ``where`` it came from (a file and row).

    Refused: empty names, ``.`` and ``..``, path separators (``/``, ``\\``), NUL and other control
    characters, and drive prefixes such as ``C:``.

    Example:
        >>> check_label("cat")
        'cat'
    """
    at = f" ({where})" if where else ""
    if not isinstance(label, str) or label == "" or not label.strip():
        problem = "is empty"
    elif label in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in label or "\\" in label or (os.altsep and os.altsep in label):
        problem = "contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        problem = "contains a control character"
    elif len(label) >= 2 and label[1] == ":" and label[0].isalpha():
        problem = "starts with a drive letter"
    else:
        return label
    raise DataError(f"class name {label!r}{at} {problem}: a class name becomes a folder name, so it must be one "
                    "plain name (no '/', '\\', '..', control characters).")


def inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root/parts...`` after checking each part with :func:`check_label` and that the resolved path is
    inside ``root`` (symbolic links included)."""
    for part in parts:
        check_label(part)
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base):
        raise DataError(f"'{path}' resolves outside '{base}'; refusing to write there.")
    return path
