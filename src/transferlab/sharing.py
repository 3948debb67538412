"""What the processes of one launcher share: rank 0's plan and head, and inference in shares (each rank
predicts its share of the files and every rank, or rank 0, which writes, gets the whole result in the
files' order), with the record of who did what."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data.scan import Dataset, Sample
from .distributed import World, all_gather_json, all_gather_rows, broadcast_json, broadcast_module, owners
from .predict import Prediction, Predictor
from .training.plan import Plan

__all__ = ["EVAL_BLOCK", "agree_engine", "predict_proba_shared", "predict_shared", "shared_plan", "shared_start",
           "distributed_record", "extraction_shares", "evaluation_shares"]

#: Files per forward pass when evaluating, and the block the ranks share files in.
EVAL_BLOCK = 32


def agree_engine(predictor: Predictor, world: World) -> None:
    """Every rank runs rank 0's engine: the two engines' outputs differ in the last digits."""
    name = all_gather_json(world, predictor.engine)[0]
    if name != predictor.engine:
        predictor.use_engine(name, "rank 0's choice")


def predict_proba_shared(predictor: Predictor, paths: Sequence[str], world: World,
                         **options: Any) -> tuple[np.ndarray, list[str | None]]:
    """:meth:`Predictor.predict_proba` of ``paths``, each rank computing blocks of the predictor's batch."""
    if not world.active:
        return predictor.predict_proba(paths, **options)
    agree_engine(predictor, world)
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
    agree_engine(predictor, world)
    shares = owners(len(paths), world, getattr(predictor, "batch_size", EVAL_BLOCK))
    mine = predictor.predict([paths[i] for i in shares[world.rank]], **options)
    merged: list[Prediction | None] = [None] * len(paths)
    for rows, part in zip(shares, all_gather_json(world, [p.to_dict() for p in mine])):
        for i, d in zip(rows, part):
            merged[i] = Prediction.from_dict(d)
    return [p for p in merged if p is not None]


def extraction_shares(samples: Sequence[Sample], ok: np.ndarray, world: World, block: int) -> list[int]:
    """Validation and test images whose features each rank extracted (the head evaluates on those)."""
    return [sum(1 for i in rows if ok[i] and samples[i].split in ("val", "test"))
            for rows in owners(len(samples), world, block)]


def shared_plan(world: World, make: Callable[[], Plan]) -> Plan:
    """The plan rank 0 makes (it alone measures this machine's costs), on every rank: each process then
    trains the same number of epochs at the same size."""
    plan = make() if world.is_zero else None
    if not world.active:
        return plan  # type: ignore[return-value]
    return Plan(**broadcast_json(world, plan.to_dict() if plan is not None else None))


def shared_start(world: World, head: torch.nn.Module, initial_val_loss: float | None) -> float | None:
    """Fine-tuning starts from rank 0's head and its validation loss on every rank."""
    broadcast_module(world, head)
    return broadcast_json(world, initial_val_loss)


def distributed_record(world: World, stats: Any, evaluated: list[int] | None) -> dict[str, Any]:
    """``metrics.json``'s ``distributed``: the world size and the images each rank extracted and evaluated
    (``stats``: the head stage's :class:`~transferlab.stages.HeadStats`; ``evaluated``: the shares of the
    evaluation from the files, when it ran)."""
    none = [0] * world.size
    return {"world_size": world.size, "extracted_per_rank": stats.extracted_per_rank or none,
            "evaluated_per_rank": evaluated if evaluated is not None else stats.evaluated_per_rank or none}


def evaluation_shares(ds: Dataset, world: World) -> list[int]:
    """Validation and test images each rank's forward pass ran on in :func:`~transferlab.stages.evaluate_files`."""
    per_split = [owners(sum(1 for s in ds.samples if s.split == sp), world, EVAL_BLOCK) for sp in ("val", "test")]
    return [sum(len(split[r]) for split in per_split) for r in range(world.size)]
