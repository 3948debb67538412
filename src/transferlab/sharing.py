"""Inference shared across the processes of one launcher: each rank predicts its share of the files and
every rank (or rank 0, which writes) gets the whole result, in the files' order."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .distributed import World, all_gather_json, all_gather_rows, owners
from .predict import Prediction, Predictor

__all__ = ["EVAL_BLOCK", "predict_proba_shared", "predict_shared"]

#: Files per forward pass when evaluating, and the block the ranks share files in.
EVAL_BLOCK = 32


def predict_proba_shared(predictor: Predictor, paths: Sequence[str], world: World,
                         **options: Any) -> tuple[np.ndarray, list[str | None]]:
    """:meth:`Predictor.predict_proba` of ``paths``, each rank computing blocks of the predictor's batch."""
    if not world.active:
        return predictor.predict_proba(paths, **options)
    shares = owners(len(paths), world, predictor.batch_size)
    probs, errors = predictor.predict_proba([paths[i] for i in shares[world.rank]], **options)
    parts = all_gather_rows(world, np.asarray(probs, dtype=np.float64))
    every_error = all_gather_json(world, list(errors))
    out = np.full((len(paths), parts[0].shape[1]), np.nan)
    merged: list[str | None] = [None] * len(paths)
    for rows, part, errs in zip(shares, parts, every_error):
        if rows:
            out[rows] = part
        for i, e in zip(rows, errs):
            merged[i] = e
    return out, merged


def predict_shared(predictor: Any, paths: Sequence[str], world: World, **options: Any) -> list[Prediction]:
    """:meth:`Predictor.predict` of ``paths`` (any engine), each rank predicting its share; every rank gets
    every prediction, in the order of ``paths``."""
    if not world.active:
        return predictor.predict(paths, **options)
    shares = owners(len(paths), world, getattr(predictor, "batch_size", EVAL_BLOCK))
    mine = predictor.predict([paths[i] for i in shares[world.rank]], **options)
    merged: list[Prediction | None] = [None] * len(paths)
    for rows, part in zip(shares, all_gather_json(world, [p.to_dict() for p in mine])):
        for i, d in zip(rows, part):
            merged[i] = Prediction.from_dict(d)
    return [p for p in merged if p is not None]
