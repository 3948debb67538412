"""A race of training recipes on validation: successive halving (Jamieson & Talwalkar, 2016).

Every candidate trains for the same short slice of seconds, validated inside the slice; the better half
(at least one) goes on to the next rung with twice the slice; the last one standing is the survivor,
which then gets the rest of the budget. Nothing here knows how a candidate trains: :func:`successive_halving`
takes a function that runs one candidate for some seconds and returns what validation said, so the rules
are tested without a network.

Each rung is a fresh short run from the candidate's start, not a continuation: a one-cycle schedule
planned for a slice cannot be stretched into the survivor's longer one (Hyperband's variant without
resuming). The survivor is trained again from its start with a schedule planned for the time left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["Candidate", "RungResult", "Race", "successive_halving", "slice_seconds", "RACE_SHARE", "MIN_SLICE_S"]

#: Share of the fine-tuning budget the race's rungs may spend together; the survivor gets the rest.
RACE_SHARE = 0.25
#: A slice shorter than this says nothing (a few steps, one validation): no race, the first candidate runs.
MIN_SLICE_S = 5.0


@dataclass(frozen=True)
class Candidate:
    """One training recipe. ``name``: short id (``recipe``, ``bn-adapt``, ``orient``, ``scratch``, ``transfer``);
    ``description``: one line for people; ``options``: what the strategy needs to build and train it."""

    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


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


def slice_seconds(n_candidates: int, budget_s: float, share: float = RACE_SHARE) -> float:
    """The first rung's slice: ``share`` of ``budget_s`` spread over every rung's candidate-slices
    (a rung keeps the better half and doubles the slice)."""
    units, alive, mult = 0.0, n_candidates, 1.0
    while alive > 1:
        units += alive * mult
        alive, mult = max(1, alive // 2), mult * 2
    return share * budget_s / units if units else 0.0


def successive_halving(candidates: Sequence[Candidate], slice_s: float,
                       run: Callable[[Candidate, float, int], RungResult],
                       announce: Callable[[str], None] = lambda line: None) -> Race:
    """Race ``candidates``: ``run(candidate, seconds, rung)`` trains one for about ``seconds`` and
    returns its :class:`RungResult`. Returns the :class:`Race` with its ``winner``. With one candidate,
    or a slice under :data:`MIN_SLICE_S`, nothing is raced and the first candidate wins."""
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
    alive, seconds, rung = list(candidates), slice_s, 0
    while len(alive) > 1:
        results: list[tuple[Candidate, RungResult]] = []
        for c in alive:
            res = run(c, seconds, rung)
            results.append((c, res))
            announce(f"race rung {rung + 1}: {c.name} {res.seconds:.0f}s (slice {seconds:.0f}s), "
                     f"best validation accuracy {res.val_acc:.4f}")
        ranked = sorted(results, key=lambda cr: cr[1].score(), reverse=True)
        keep = max(1, len(alive) // 2)
        race.rungs.append([{"candidate": c.name, "rung": rung + 1, "slice_s": round(seconds, 1),
                            "seconds": round(r.seconds, 1), "epochs": round(r.epochs, 3), "val_acc": _finite(r.val_acc),
                            "val_loss": _finite(r.val_loss), "kept": i < keep, "validations": r.validations}
                           for i, (c, r) in enumerate(ranked)])
        for c, r in ranked[keep:]:
            race.status[c.name] = f"dropped after rung {rung + 1}"
            announce(f"race: {c.name} dropped ({r.val_acc:.4f} against {ranked[0][1].val_acc:.4f})")
        alive = [c for c, _ in ranked[:keep]]
        seconds, rung = seconds * 2, rung + 1
    race.winner = alive[0]
    race.status[alive[0].name] = "survivor"
    race.reason = f"best validation accuracy after {rung} rung(s)"
    announce(f"race: {alive[0].name} survives and gets the rest of the budget")
    return race
