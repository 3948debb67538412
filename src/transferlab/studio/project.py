"""A studio project: an ordinary transferlab dataset and runs folder.

``PROJECT/data/<class>/<image>`` is what ``transferlab train PROJECT/data`` reads, ``PROJECT/runs/<run>/``
what it writes, so the page and the CLI can take turns. Nothing is deleted: a removed image or class goes
to ``PROJECT/.trash/<date-time>/`` with its folder structure. Every name from the page is checked as a
plain folder or file name before it touches the disk.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import write_json
from ..data.images import decode, is_image_path
from ..data.labels import check_label, inside
from ..errors import DataError, ImageError

__all__ = ["Project", "EXTENSIONS", "safe_download_name"]

#: File extension for each format an upload may have (what :func:`decode` accepts).
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
_counter = itertools.count()


@dataclass
class Project:
    """The project folder; created (with ``data/`` and ``runs/``) if it does not exist."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        self.data.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def classes(self) -> list[dict[str, Any]]:
        """``[{"name", "count", "images": [file names]}]`` in name order."""
        out = []
        for folder in sorted(p for p in self.data.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_path(p.name))
            out.append({"name": folder.name, "count": len(images), "images": images})
        return out

    def class_dir(self, name: str, must_exist: bool = True) -> Path:
        path = inside(self.data, check_label(name, "the class name"))
        if must_exist and not path.is_dir():
            raise DataError(f"no class '{name}' in this project.")
        return path

    def add_class(self, name: str) -> None:
        path = self.class_dir(name, must_exist=False)
        if path.exists():
            raise DataError(f"class '{name}' already exists.")
        path.mkdir()

    def rename_class(self, name: str, new: str) -> None:
        src, dst = self.class_dir(name), self.class_dir(new, must_exist=False)
        if dst.exists():
            raise DataError(f"class '{new}' already exists.")
        src.rename(dst)

    def remove_class(self, name: str) -> Path:
        """Move the class folder to the trash; returns where it went."""
        return self.to_trash(self.class_dir(name))

    def image_path(self, cls: str, file: str) -> Path:
        folder = self.class_dir(cls)
        path = inside(folder, check_label(file, "the image name"))
        if not path.is_file():
            raise DataError(f"no image '{file}' in class '{cls}'.")
        return path

    def remove_image(self, cls: str, file: str) -> Path:
        return self.to_trash(self.image_path(cls, file))

    def add_image(self, cls: str, data: bytes, max_pixels: int) -> str:
        """Validate ``data`` as :func:`scan` does and save it under a new name; returns the name.

        Raises:
            ImageError: not an image transferlab reads (the reason says why)."""
        folder = self.class_dir(cls)
        _, info = decode(data, max_pixels=max_pixels, name="the upload")
        ext = EXTENSIONS.get(info.format)
        if ext is None:
            raise ImageError(f"format {info.format or 'unknown'} is not one transferlab reads")
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_counter):05d}{ext}"
        tmp = folder / f".{name}.part"
        tmp.write_bytes(data)
        tmp.replace(folder / name)
        return name

    def to_trash(self, path: Path) -> Path:
        """Move ``path`` (inside the project) to ``.trash/<date-time>/`` keeping its place; returns where."""
        rel = path.relative_to(self.root)
        dst = self.root / ".trash" / time.strftime("%Y%m%d-%H%M%S") / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(dst))
        return dst

    def run_list(self) -> list[dict[str, Any]]:
        """Finished runs (with a model), newest first: name, date, test accuracy, mode, whether in use."""
        chosen = self.selected_run()
        out = []
        for run in sorted((p for p in self.runs.iterdir() if (p / "model" / "config.json").is_file()),
                          key=lambda p: p.stat().st_mtime, reverse=True):
            m = _read_json(run / "metrics.json")
            test = m.get("test") or {}
            out.append({"name": run.name, "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.stat().st_mtime)),
                        "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"), "mode": m.get("mode"),
                        "test_images": test.get("n"), "in_use": run.name == chosen,
                        "report": (run / "report.html").is_file()})
        return out

    def run_dir(self, name: str) -> Path:
        path = inside(self.runs, check_label(name, "the run name"))
        if not (path / "model" / "config.json").is_file():
            raise DataError(f"no finished run '{name}' in this project.")
        return path

    def selected_run(self) -> str | None:
        """The run whose model the page uses: the one chosen, else the newest."""
        chosen = _read_json(self.root / "studio.json").get("model")
        if chosen and (self.runs / chosen / "model" / "config.json").is_file():
            return chosen
        runs = sorted((p for p in self.runs.iterdir() if (p / "model" / "config.json").is_file()),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        return runs[0].name if runs else None

    def select_run(self, name: str) -> None:
        self.run_dir(name)
        write_json(self.root / "studio.json", {"model": name})

    def new_run_name(self) -> str:
        base = time.strftime("%Y%m%d-%H%M%S")
        name, k = base, 1
        while (self.runs / name).exists():
            name, k = f"{base}-{k}", k + 1
        return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def safe_download_name(name: str) -> str:
    """A file name for Content-Disposition: letters, digits, dot, dash, underscore."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "download"
