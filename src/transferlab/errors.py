"""The one exception hierarchy of transferlab.

Every error a user can act on is a :class:`TransferlabError`; its message says what was received and
how to fix it. The CLI prints these without a traceback.
"""

from __future__ import annotations

__all__ = [
    "TransferlabError",
    "DataError",
    "ImageError",
    "WeightsError",
    "ArtifactError",
    "ConfigError",
    "ExportError",
]


class TransferlabError(Exception):
    """Base class of every error raised on purpose by transferlab."""


class ConfigError(TransferlabError, ValueError):
    """An option or argument has a value that cannot work (quotes the value and what is expected)."""


class DataError(TransferlabError):
    """The dataset cannot be used as given: missing folder, too few classes, an empty class..."""


class ImageError(DataError):
    """One file is not a readable image; ``reason`` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (a limit, or Pillow's decompression-bomb guard)."""


class WeightsError(TransferlabError):
    """Pretrained weights could not be found, read or matched to the architecture."""


class ArtifactError(TransferlabError):
    """A saved model directory is missing files, has the wrong format version or tensor shapes."""


class ExportError(TransferlabError):
    """An exported model failed its parity check against the original."""
