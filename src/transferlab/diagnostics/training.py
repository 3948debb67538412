"""The diagnostics ``train`` runs on its training split after the head phase, while the features are in
memory: suspected label errors and the learning curve, linked from the report."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.scan import Sample
from ..errors import DataError
from .curve import LearningCurve, learning_curve
from .label_issues import LabelIssues, find_label_issues
from .outputs import curve_section, issues_section, write_issue_outputs

__all__ = ["Diagnosis", "diagnose_training", "DIAGNOSE_MAX_TRAIN"]

log = logging.getLogger("transferlab")

#: Training splits up to this many images get the diagnostics by default (beyond it they cost minutes of a
#: CPU; BENCHMARKS.md); larger sets use `data issues` and `data curve`.
DIAGNOSE_MAX_TRAIN = 5_000


@dataclass
class Diagnosis:
    """What the diagnostics found (either part may be missing, with the reason in ``notes``)."""

    issues: LabelIssues | None = None
    curve: LearningCurve | None = None
    notes: list[str] = field(default_factory=list)

    def sections(self) -> list[tuple[str, str]]:
        """(heading, HTML) sections for the report."""
        out = []
        if self.issues is not None:
            out.append(("Label issues", issues_section(self.issues)))
        if self.curve is not None:
            out.append(("Do I need more data?", curve_section(self.curve, self.curve.png())))
        return out

    def metrics(self) -> dict[str, Any]:
        """Entries for ``metrics.json``."""
        return {"label_issues": self.issues.summary() if self.issues is not None else None,
                "learning_curve": self.curve.to_dict() if self.curve is not None else None,
                "diagnostics_notes": self.notes}


def diagnose_training(samples: Sequence[Sample], x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                      classes: Sequence[str], out: str | os.PathLike[str], *, c: float | None = None,
                      seed: int = 0) -> Diagnosis:
    """Label issues over the training split (``label_issues.csv``/``.html`` in ``out``) and the learning
    curve scored on validation. ``c``: the probe head's regularisation, reused. A part that cannot run
    (a class with one image, no validation split) is skipped with a note, never failing the run."""
    d = Diagnosis()
    if len(y) > DIAGNOSE_MAX_TRAIN:
        d.notes.append(f"label issues and learning curve skipped: {len(y)} training images (more than "
                       f"{DIAGNOSE_MAX_TRAIN:,}); run `transferlab data issues` and `data curve`.")
        return d
    try:
        d.issues = find_label_issues(samples, x, classes, seed=seed, c=c)
        write_issue_outputs(d.issues, Path(out))
        log.info("label issues: %d suspected label error(s), %d outlier(s) in %.1fs (label_issues.html)",
                 int(d.issues.suspect.sum()), int(d.issues.outlier.sum()), d.issues.seconds)
    except DataError as exc:
        d.notes.append(f"label issues skipped: {exc}")
    if len(y_val):
        d.curve = learning_curve(x, y, x_val, y_val, classes, c=c, seeds=2, seed=seed)
        log.info("learning curve in %.1fs: %s", d.curve.seconds, d.curve.sentences()[0])
    else:
        d.notes.append("learning curve skipped: no validation images to score it on.")
    return d
