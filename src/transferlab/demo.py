"""``transferlab demo``: a real dataset from scikit-learn's handwritten digits, trained end to end."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["build_digits_dataset", "run_demo", "DemoResult"]

log = logging.getLogger("transferlab")


def build_digits_dataset(out: str | os.PathLike[str], size: int = 64, per_class: int | None = None) -> Path:
    """Write scikit-learn's 1,797 8x8 handwritten digits as upscaled PNGs in class folders ``0``..``9``.

    Digits are drawn dark on light, upscaled with bicubic interpolation. ``per_class`` keeps only the
    first N images of each class (for quick tests). Existing files are reused.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    seen: dict[int, int] = {}
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        k = int(target)
        if per_class is not None and seen.get(k, 0) >= per_class:
            continue
        seen[k] = seen.get(k, 0) + 1
        folder = out / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{i:04d}.png"
        if path.exists():
            continue
        pixels = (255 - np.clip(img * 16, 0, 255)).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).save(path)
    return out


@dataclass
class DemoResult:
    """Where the demo wrote its data and run, and its metrics."""

    data_dir: Path
    run_dir: Path
    metrics: dict[str, Any]
    examples: list[dict[str, Any]]


def run_demo(out: str | os.PathLike[str] = "transferlab-demo", quiet: bool = False, **train_options: Any) -> DemoResult:
    """Build the digits dataset in ``out/data``, train into ``out/run``, and predict a few test images."""
    from .pipeline import train
    from .predict import load_model

    out = Path(out)
    data = build_digits_dataset(out / "data")
    result = train(data, out / "run", quiet=quiet, overwrite=True, **{"mode": "head", **train_options})
    predictor = load_model(result.model_dir)
    with open(result.run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picks = rows[:: max(1, len(rows) // 5)][:5]
    preds = predictor.predict([r["path"] for r in picks], top_k=3)
    examples = [{"path": r["path"], "true": r["true_label"], "predicted": p.label, "probability": p.probability}
                for r, p in zip(picks, preds)]
    return DemoResult(data, result.run_dir, result.metrics, examples)
