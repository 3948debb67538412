"""Does the data have an "up"? Decided in seconds, before fine-tuning, from the frozen-feature head.

The head was fitted on the training images as they are. Its validation images are scored again, each one
turned or flipped so that its top edge is no longer on top (one of six such transforms, fixed per image). Where
the pictures have no up (cells, microscopy, aerial views, parts on a belt), the training images already
held every orientation and the head scores the turned images as well as the upright ones; where they have
one (digits: a 6 turned is a 9; clothes, faces, street scenes), it scores them worse. Fine-tuning then
augments with flips on both axes and quarter turns only where the data has no up.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from .data.transforms import EvalTransform, Preprocessing

__all__ = ["OrientationCheck", "TurnedView", "judge_orientation", "TURNS", "MIN_TOLERANCE"]

#: The transforms that move the top edge: quarter and half turns, the vertical flip and the two diagonal flips.
TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
         Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)
#: The turned images may score this much below the upright ones (or two standard errors of the paired
#: difference, if more) and the data still counts as having no up.
MIN_TOLERANCE = 0.01


class TurnedView:
    """The evaluation transform of an image first turned by one of :data:`TURNS`, chosen by its pixels and
    ``seed`` (the same image always gets the same turn, so its features can be cached)."""

    def __init__(self, pre: Preprocessing, seed: int = 0) -> None:
        self._eval, self.seed = EvalTransform(pre), seed
        self.draft = self._eval.draft

    def __call__(self, img: Image.Image):
        k = (zlib.crc32(img.tobytes()[:4096]) ^ (self.seed * 7919)) % len(TURNS)
        return self._eval(img.transpose(TURNS[k]))


@dataclass
class OrientationCheck:
    """The head's validation accuracy on the upright and the turned images of ``n`` validation images, the
    tolerance, the verdict and its cost in seconds."""

    upright: float
    turned: float
    n: int
    tolerance: float
    no_up: bool
    seconds: float

    def line(self) -> str:
        """One line for the plan and the report."""
        verdict = ("no up: fine-tuning turns and flips the images (--augment orient)" if self.no_up else
                   "the data has an up: no turns in fine-tuning")
        return (f"orientation: the head scores {self.n} validation images turned {self.turned:.3f} against "
                f"{self.upright:.3f} upright (tolerance {self.tolerance:.3f}): {verdict} ({self.seconds:.1f}s)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``decisions.orientation`` in plan.json and metrics.json)."""
        return {**asdict(self), "upright": round(self.upright, 4), "turned": round(self.turned, 4),
                "tolerance": round(self.tolerance, 4), "seconds": round(self.seconds, 2), "line": self.line()}


def judge_orientation(upright_correct: np.ndarray, turned_correct: np.ndarray, seconds: float = 0.0) -> OrientationCheck:
    """The verdict from each validation image's correctness upright and turned (paired): no up when the
    turned accuracy is at most :data:`MIN_TOLERANCE`, or two standard errors of the paired difference,
    below the upright one."""
    up, turned = np.asarray(upright_correct, float), np.asarray(turned_correct, float)
    n = len(up)
    diff = turned - up
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 1.0
    tolerance = max(MIN_TOLERANCE, 2 * se)
    a_up, a_turned = float(up.mean()) if n else 0.0, float(turned.mean()) if n else 0.0
    return OrientationCheck(a_up, a_turned, n, tolerance, bool(n and a_turned >= a_up - tolerance), seconds)
