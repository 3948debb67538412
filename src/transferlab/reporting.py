"""Writing prediction results to CSV or JSON files."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

from ._io import write_text
from .errors import ConfigError
from .predict import Prediction

__all__ = ["write_predictions"]


def write_predictions(results: Sequence[Prediction], path: str | os.PathLike[str]) -> None:
    """Write predictions as ``.json`` (a list of objects) or ``.csv`` (path, label, probability, top-k, error)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--output {str(path)!r}: expected a .csv or .json file name.")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "probability", "top_k", "error"])
    for r in results:
        top = ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.top_k)
        w.writerow([r.source, r.label or "", "" if r.probability is None else f"{r.probability:.6f}", top, r.error or ""])
    write_text(path, buf.getvalue())
