"""A race of training recipes on validation: successive halving (Jamieson & Talwalkar, 2016) judged at the
survivor's horizon.

Every candidate trains for the same short slice of seconds, validated inside the slice; while more than
two are left the better half (at least two) goes on to the next rung with twice the slice; the last two
are decided after each has run at two slice lengths, by the validation error each would reach at the
survivor's horizon: the error of its longer slice extrapolated along the power law ``err ~ t**-alpha``
through its two slices (the learning-curve model of Domhan et al., 2015, at its simplest). Comparing at
the slice itself would favour what learns fast early: a pretrained network is ahead of a CNN from scratch
after a minute and behind it after fifteen. Nothing here knows how a candidate trains:
:func:`successive_halving` takes a function that runs one candidate for some seconds and returns what
validation said, so the rules are tested without a network.

Each rung is a fresh short run from the candidate's start, not a continuation: a one-cycle schedule
planned for a slice cannot be stretched into the survivor's longer one. The survivor is trained again
from its start with a schedule planned for the time left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

__all__ = ["Candidate", "RungResult", "Race", "successive_halving", "slice_seconds", "projected_error", "rung_sizes",
           "RACE_SHARE", "MIN_SLICE_S"]

#: Share of the fine-tuning budget the race's rungs may spend together; the survivor gets the rest.
RACE_SHARE = 0.3
#: A slice shorter than this says nothing (a few steps, one validation): no race, the first candidate runs.
MIN_SLICE_S = 5.0


class Candidate(Protocol):
    """What the race needs of a contestant (a :class:`~transferlab.training.recipes.Recipe`): a short id
    and one line for people."""

    name: str
    description: str


@dataclass
class RungResult:
    """What one slice of training said: the best validation accuracy (and loss) reached, the seconds it
    took and every validation pass (``validations``: seconds, val_acc, ...)."""

    val_acc: float
    val_loss: float
    seconds: float
    validations: list[dict[str, Any]] = field(default_factory=list)
    epochs: float = 0.0

    def score(self) -> tuple[float, float]:
        """Higher is better: accuracy first, then the lower loss."""
        acc = self.val_acc if math.isfinite(self.val_acc) else -1.0
        loss = self.val_loss if math.isfinite(self.val_loss) else math.inf
        return acc, -loss


@dataclass
class Race:
    """The race's record: every candidate with its rungs and fate, and the survivor."""

    candidates: list[Candidate]
    slice_s: float
    rungs: list[list[dict[str, Any]]] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)
    winner: Candidate | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``metrics.json`` ``strategy``, ``plan.json``)."""
        return {"candidates": [{"name": c.name, "description": c.description, "status": self.status.get(c.name, ""),
                                "rungs": [r for rung in self.rungs for r in rung if r["candidate"] == c.name]}
                               for c in self.candidates],
                "slice_s": round(self.slice_s, 1), "winner": self.winner.name if self.winner else None,
                "reason": self.reason}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def rung_sizes(n: int) -> list[int]:
    """Candidates in each rung: halving (never below two) until two are left; two alone run twice, so
    that each has slices of two lengths to extrapolate from."""
    if n <= 1:
        return []
    sizes = [n]
    while sizes[-1] > 2:
        sizes.append(max(2, sizes[-1] // 2))
    return [2, 2] if n == 2 else sizes


def slice_seconds(n_candidates: int, budget_s: float, share: float = RACE_SHARE) -> float:
    """The first rung's slice: ``share`` of ``budget_s`` spread over every rung's candidate-slices
    (each rung doubles the slice)."""
    units = sum(k * 2 ** i for i, k in enumerate(rung_sizes(n_candidates)))
    return share * budget_s / units if units else 0.0


def projected_error(points: list[tuple[float, float]], horizon_s: float) -> float:
    """Validation error at ``horizon_s`` seconds from ``(seconds, error)`` points of slices of different
    lengths: the power law through the last two (exponent clipped to [0, 1]; no gain means a flat curve),
    or the last error itself with one point."""
    (t1, e1), (t2, e2) = (points[-2], points[-1]) if len(points) >= 2 else (points[-1], points[-1])
    if t2 <= t1 or e2 <= 0 or e1 <= 0 or horizon_s <= t2:
        return max(0.0, e2)
    alpha = min(1.0, max(0.0, math.log(e1 / e2) / math.log(t2 / t1)))
    return e2 * (horizon_s / t2) ** -alpha


def successive_halving(candidates: Sequence[Candidate], slice_s: float,
                       run: Callable[[Candidate, float, int], RungResult],
                       announce: Callable[[str], None] = lambda line: None, horizon_s: float = 0.0) -> Race:
    """Race ``candidates``: ``run(candidate, seconds, rung)`` trains one for about ``seconds`` and
    returns its :class:`RungResult`. ``horizon_s``: the seconds the survivor will train, at which the
    last two are compared. Returns the :class:`Race` with its ``winner``. With one candidate, or a slice
    under :data:`MIN_SLICE_S`, nothing is raced and the first candidate wins."""
    race = Race(list(candidates), slice_s)
    if not candidates:
        raise ValueError("a race needs at least one candidate")
    if len(candidates) == 1 or slice_s < MIN_SLICE_S:
        race.winner = candidates[0]
        race.status = {c.name: "not raced" for c in candidates}
        race.status[candidates[0].name] = "survivor"
        race.reason = ("one candidate" if len(candidates) == 1 else
                       f"a slice would be {slice_s:.0f}s, too short to tell candidates apart: the first one runs")
        return race
    curves: dict[str, list[tuple[float, float]]] = {c.name: [] for c in candidates}
    alive, seconds = list(candidates), slice_s
    sizes = rung_sizes(len(candidates))
    for rung, size in enumerate(sizes):
        results: list[tuple[Candidate, RungResult]] = []
        for c in alive:
            res = run(c, seconds, rung)
            results.append((c, res))
            curves[c.name].append((max(res.seconds, 1e-3), 1.0 - res.val_acc if res.val_acc >= 0 else 1.0))
            announce(f"race rung {rung + 1}: {c.name} {res.seconds:.0f}s (slice {seconds:.0f}s), "
                     f"best validation accuracy {res.val_acc:.4f}")
        final = rung == len(sizes) - 1
        if final:  # the last two (or the last of three and more): at the survivor's horizon
            score = {c.name: 1.0 - projected_error(curves[c.name], horizon_s) for c, _ in results}
        else:
            score = {c.name: r.score()[0] for c, r in results}
        loss = {c.name: r.score()[1] for c, r in results}
        ranked = sorted(results, key=lambda cr: (score[cr[0].name], loss[cr[0].name]), reverse=True)
        keep = 1 if final else sizes[rung + 1]
        race.rungs.append([{"candidate": c.name, "rung": rung + 1, "slice_s": round(seconds, 1),
                            "seconds": round(r.seconds, 1), "epochs": round(r.epochs, 3),
                            "val_acc": _finite(r.val_acc), "val_loss": _finite(r.val_loss),
                            "projected_val_acc": round(score[c.name], 4) if final else None,
                            "kept": i < keep, "validations": r.validations}
                           for i, (c, r) in enumerate(ranked)])
        what = f"projected at {horizon_s:.0f}s" if final else "best"
        for c, _ in ranked[keep:]:
            race.status[c.name] = f"dropped after rung {rung + 1}"
            announce(f"race: {c.name} dropped ({what} validation accuracy {score[c.name]:.4f} against "
                     f"{score[ranked[0][0].name]:.4f})")
        alive = [c for c, _ in ranked[:keep]]
        seconds *= 2
    race.winner = alive[0]
    race.status[alive[0].name] = "survivor"
    race.reason = (f"best validation accuracy projected at the survivor's {horizon_s:.0f}s after "
                   f"{len(sizes)} rung(s)")
    announce(f"race: {alive[0].name} survives and gets the rest of the budget")
    return race
