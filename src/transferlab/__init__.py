"""transferlab: a folder of labelled images -> a good image classifier, by transfer learning."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# libgomp's OpenMP threads busy-wait for a long while after each parallel region of the forward pass,
# taking the cores from the decoding workers; a short spin extracts large JPEGs faster on 2 cores with the
# same single-image latency (BENCHMARKS.md). The variable is read when
# torch loads, so it only applies when transferlab is imported first; a user's own setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .errors import (ArtifactError, ConfigError, DataError, ExportError, ImageError, TransferlabError,  # noqa: E402
                     WeightsError)

__all__ = ["__version__", "TransferlabError", "DataError", "ImageError", "WeightsError", "ArtifactError",
           "ConfigError", "ExportError", "train", "evaluate", "load_model", "TrainConfig", "scan",
           "create_backbone"]


def __getattr__(name: str):  # lazy: `import transferlab` stays fast, torch loads on first use
    if name in ("train", "TrainConfig"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "load_model":
        from .predict import load_model

        return load_model
    if name == "scan":
        from .data.scan import scan

        return scan
    if name == "create_backbone":
        from .backbones.models import create_backbone

        return create_backbone
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
