"""The logistic-regression probe as a building block: fitted many times on subsets of cached features.

The label-issue search and the learning curve fit dozens of small probes; each is scikit-learn's
L2-regularised multinomial logistic regression on features standardised as the head's
:class:`~transferlab.backbones.models.Standardize` does (centred, one scalar scale).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from ..training.head import PROBE_CS

__all__ = ["standardizer", "compress", "fit_predict", "choose_c", "DIMS"]

#: Principal directions kept for the many small probes of the diagnostics: on the digits' 1,280-d
#: features the label-issue search ran 2.3x faster at 256 with the same recall of flipped labels.
DIMS = 256


def standardizer(x: np.ndarray):
    """A function that centres and scales features with the statistics of ``x`` (float64 out)."""
    mean = x.mean(0)
    scale = float(np.sqrt(x.var(0).mean())) if len(x) > 1 else 1.0
    scale = max(scale, 1e-6)
    return lambda z: (np.asarray(z, np.float64) - mean) / scale


def compress(x_fit: np.ndarray, *others: np.ndarray, dims: int = DIMS) -> list[np.ndarray]:
    """Standardise ``x_fit`` and ``others`` with ``x_fit``'s statistics, then keep ``x_fit``'s top ``dims``
    principal directions. The kept directions keep their scale, so a probe's ``C`` means what it
    means on the full features; fits on ``dims`` columns are several times faster."""
    std = standardizer(x_fit)
    out = [std(x_fit), *(std(o) for o in others)]
    if out[0].shape[1] <= dims or len(out[0]) <= dims:
        return out
    basis = np.linalg.svd(out[0] - out[0].mean(0), full_matrices=False)[2][:dims]
    return [z @ basis.T for z in out]


def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, num_classes: int, c: float,
                max_iter: int = 300, standardize: bool = True) -> np.ndarray:
    """Probabilities ``(len(x_eval), num_classes)`` of a probe fitted on ``(x_fit, y_fit)``; a class absent
    from ``y_fit`` gets probability 0. ``standardize=False`` for features that :func:`compress` made."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probs = np.zeros((len(x_eval), num_classes))
    present = np.unique(y_fit)
    if len(present) == 1:
        probs[:, present[0]] = 1.0
        return probs
    xf, xe = np.asarray(x_fit, np.float64), np.asarray(x_eval, np.float64)
    if standardize:
        std = standardizer(x_fit)
        xf, xe = std(x_fit), std(x_eval)
    if len(xf) < xf.shape[1]:  # an L2-penalised solution lies in the training rows' span: fit there, exactly
        basis = np.linalg.svd(xf, full_matrices=False)[2]
        xf, xe = xf @ basis.T, xe @ basis.T
    clf = LogisticRegression(C=c, max_iter=max_iter, tol=1e-3)
    with warnings.catch_warnings():  # a probe a little short of convergence ranks images just as well
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xf, y_fit)
    probs[:, clf.classes_] = clf.predict_proba(xe)
    return probs


def choose_c(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
             cs: Sequence[float] = PROBE_CS, standardize: bool = True) -> float:
    """The ``C`` among ``cs`` with the lowest validation log-loss (the head's own rule)."""
    best, best_loss = cs[len(cs) // 2], np.inf
    for c in cs:
        p = fit_predict(x_fit, y_fit, x_val, num_classes, c, standardize=standardize)
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y_val)), y_val], 1e-12, None))))
        if loss < best_loss:
            best, best_loss = c, loss
    return best
