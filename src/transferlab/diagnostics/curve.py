"""The learning curve: "do I need more data?", answered from cached features in seconds.

The probe head is fitted on 10, 20, 40, 80 and 100% of the training split (stratified, several seeds
at each fraction; on the features' top principal directions, as the label-issue search) and scored
on held-out images, overall and per class. A power law of the error,
``err(n) = a * n ** -b`` (the form learning curves take over a decade of data; Hestness et al. 2017),
fitted on those points in log-log space extrapolates to 2x and 4x the data. The extrapolation is a
guide, not a promise: a pure power law has no floor, so gains at 4x are an upper estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .probe import choose_c, compress, fit_predict

__all__ = ["LearningCurve", "learning_curve", "fit_power_law", "FRACTIONS", "PLATEAU_POINTS"]

#: Shares of the training split the probe is fitted on.
FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.0)
#: A class whose projected gain from doubling its images is below this many points has plateaued.
PLATEAU_POINTS = 0.5


def fit_power_law(n: Sequence[float], err: Sequence[float]) -> tuple[float, float] | None:
    """``(a, b)`` of ``err = a * n ** -b`` by least squares in log-log space (``None`` with fewer than two
    points of positive error); ``b`` is clipped at 0 (more data never hurts in the projection)."""
    pts = [(x, e) for x, e in zip(n, err) if x > 0 and e > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    lx, le = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(lx, le, 1)
    b = max(0.0, -float(slope))
    a = float(np.exp(np.mean(le + b * lx))) if b == 0.0 else float(np.exp(intercept))
    return a, b


def _project(fit: tuple[float, float] | None, n: float, factor: float, now: float) -> float:
    """Accuracy at ``factor`` times ``n`` images: the measured accuracy plus the error the fitted law
    loses between ``n`` and ``factor * n``."""
    if fit is None:
        return now
    a, b = fit
    return min(1.0, now + a * n ** -b * (1.0 - factor ** -b))


@dataclass
class LearningCurve:
    """Accuracy against training-set size, overall and per class, with 2x and 4x projections."""

    classes: list[str]
    fractions: list[float]
    n_train: list[int]
    accuracy: list[float]
    accuracy_std: list[float]
    per_class: dict[str, list[float]]
    per_class_n: dict[str, list[int]]
    projection: dict[str, dict[str, float]] = field(default_factory=dict)
    scored_on: str = "val"
    n_scored: int = 0
    seeds: int = 3
    c: float = 1.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``learning_curve.json``; ``metrics.json`` has it as ``learning_curve``)."""
        d = dict(self.__dict__)
        d["sentences"] = self.sentences()
        return d

    def sentences(self) -> list[str]:
        """Plain-language reading of the curve: overall, then the classes that would gain most and
        those that have plateaued."""
        overall = self.projection.get("overall", {})
        now, x2 = overall.get("now", self.accuracy[-1]), overall.get("2x", self.accuracy[-1])
        out = [f"Doubling the training images would likely raise accuracy from {100 * now:.1f}% to about "
               f"{100 * x2:.1f}% (+{100 * (x2 - now):.1f} points; 4x: {100 * overall.get('4x', x2):.1f}%), "
               f"judging by the probe head on {self.scored_on} ({self.n_scored} images)."]
        gains = sorted(((p["2x"] - p["now"], name) for name, p in self.projection.items() if name != "overall"),
                       reverse=True)
        grow = [(g, name) for g, name in gains if 100 * g >= PLATEAU_POINTS]
        flat = [name for g, name in gains if 100 * g < PLATEAU_POINTS]
        for g, name in grow[:3]:
            out.append(f"Doubling the images of class '{name}' would likely gain ~{100 * g:.1f} points of its recall.")
        if flat:
            out.append(f"Plateaued (under {PLATEAU_POINTS:g} point from doubling): "
                       + ", ".join(f"'{n}'" for n in flat[:10]) + (" ..." if len(flat) > 10 else "") + ".")
        return out

    def png(self) -> bytes:
        """The curve as a plot: overall accuracy with its seed spread, each class, and the projections."""
        from ..evaluation.plots import figure_png, plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        n = np.array(self.n_train, float)
        acc, std = np.array(self.accuracy), np.array(self.accuracy_std)
        ax = axes[0]
        ax.fill_between(n, acc - std, acc + std, alpha=0.2)
        ax.plot(n, acc, "-o", label="measured (mean of seeds)")
        p = self.projection.get("overall")
        if p:
            ax.plot([n[-1], 2 * n[-1], 4 * n[-1]], [p["now"], p["2x"], p["4x"]], "--s", label="power-law projection")
        ax.set_xscale("log")
        ax.set_xlabel("training images")
        ax.set_ylabel(f"accuracy ({self.scored_on})")
        ax.set_title("learning curve (probe head on cached features)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax = axes[1]
        for name in self.classes:
            ax.plot(self.per_class_n[name], self.per_class[name], "-o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("recall")
        ax.set_title("per class")
        ax.grid(alpha=0.3, which="both")
        if len(self.classes) <= 12:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return figure_png(fig)


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.permutation(idx)[: max(1, int(round(fraction * len(idx))))])
    return np.sort(np.concatenate(keep))


def learning_curve(xtr: np.ndarray, ytr: np.ndarray, xev: np.ndarray, yev: np.ndarray, classes: Sequence[str], *,
                   c: float | None = None, fractions: Sequence[float] = FRACTIONS, seeds: int = 3, seed: int = 0,
                   scored_on: str = "val") -> LearningCurve:
    """Fit the probe on growing shares of ``(xtr, ytr)`` and score it on ``(xev, yev)``.

    ``c`` is the probe's regularisation (chosen on the scored split when not given). Each fraction
    below 1 is fitted ``seeds`` times on different stratified subsets; the full set once.

    Example:
        >>> curve = learning_curve(xtr, ytr, xva, yva, classes)  # doctest: +SKIP
        >>> print(curve.sentences()[0])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    k = len(classes)
    xtr, xev = compress(xtr, xev)
    if c is None:
        c = choose_c(xtr, ytr, xev, yev, k, standardize=False)
    rng = np.random.default_rng(seed)
    counts = np.bincount(ytr, minlength=k)
    n_train, acc, acc_std = [], [], []
    per_class: dict[str, list[float]] = {name: [] for name in classes}
    per_class_n: dict[str, list[int]] = {name: [] for name in classes}
    for f in fractions:
        runs = []
        for _ in range(1 if f >= 1.0 else seeds):
            idx = _stratified(ytr, f, rng)
            pred = fit_predict(xtr[idx], ytr[idx], xev, k, c, standardize=False).argmax(1)
            runs.append(pred == yev)
        right = np.array(runs, float)
        n_train.append(int(sum(max(1, int(round(f * n))) for n in counts if n)))
        acc.append(float(right.mean()))
        acc_std.append(float(right.mean(1).std()))
        for j, name in enumerate(classes):
            m = yev == j
            per_class[name].append(float(right[:, m].mean()) if m.any() else math.nan)
            per_class_n[name].append(max(1, int(round(f * counts[j]))) if counts[j] else 0)
    projection = {"overall": _projection(n_train, acc)}
    for name in classes:
        if not any(math.isnan(v) for v in per_class[name]):
            projection[name] = _projection(per_class_n[name], per_class[name])
    return LearningCurve(list(classes), list(fractions), n_train, acc, acc_std, per_class, per_class_n, projection,
                         scored_on, int(len(yev)), seeds, float(c), time.perf_counter() - t0)


def _projection(n: Sequence[int], acc: Sequence[float]) -> dict[str, float]:
    fit = fit_power_law(n, [1.0 - a for a in acc])
    now = float(acc[-1])
    out = {"now": now, "2x": _project(fit, n[-1], 2, now), "4x": _project(fit, n[-1], 4, now)}
    if fit:
        out["a"], out["b"] = fit
    return out
