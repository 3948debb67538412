"""The main job, end to end: ``train`` as named stages.

prepare (options, processes, scan, split, audit, backbone) -> decide (head or not, which recipes) -> plan
-> head (features, cached) -> plan again and fall back if nothing fits -> fine-tune (race or single recipe)
-> finish (calibration, artifact, metrics, report). What the run decides is
:mod:`transferlab.decisions`; what each stage does is :mod:`transferlab.stages`; what differs between
single- and multi-label runs is :mod:`transferlab.tasks`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L

from ._io import write_json
from .backbones.models import Classifier, create_backbone
from .config import TrainConfig, config_from_dict
from .data.audit import audit, dedupe_across_splits
from .data.scan import scan
from .data.split import split_dataset, write_skipped_csv, write_split_csv
from .decisions import Decision, decide, fallback, whole_network
from .distributed import SINGLE, World, first_launched, join, launch_layout
from .errors import ConfigError, DataError
from .events import emit
from .finish import RunResult, jsonable
from .planning import plan_finetune, plan_run
from .sharing import shared_plan
from .stages import Prepared, Trained, finetune_stage, head_stage, orientation_stage
from .strategy import with_race_estimate
from .tasks import task_for
from .training.callbacks import History
from .training.plan import Plan, native_size

__all__ = ["TrainConfig", "RunResult", "train", "prepare", "default_run_dir"]

log = logging.getLogger("transferlab")


def default_run_dir() -> Path:
    """``runs/<date>-<time>`` in the current folder."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(data: str | os.PathLike[str] | None, out: str | os.PathLike[str] | None = None,
          config: TrainConfig | None = None, resume: bool = False, started_at: float | None = None,
          overwrite: bool = False, **overrides: Any) -> RunResult:
    """Train a classifier on a labelled image folder and write a full run directory.

    Args:
        data: class folders, pre-split folders or a CSV manifest (a previous run's split.csv works).
            Ignored with ``resume``.
        out: run directory (default ``runs/<date>-<time>``).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        resume: continue the run in ``out`` from its last checkpoint, on its own split and options.
        overwrite: replace the run already in ``out`` (its checkpoints and logs are removed once the new run's data
            and backbone have loaded); without it a folder that holds anything is refused.
        started_at: ``time.time()`` when the user started the run (the CLI passes its start), from which
            ``time_limit`` counts; default now.

    Example:
        >>> result = train("photos/", "runs/photos", mode="auto", time_limit=900)  # doctest: +SKIP
        >>> result.metrics["test"]["accuracy"]  # doctest: +SKIP
    """
    p = prepare(data, out, config, resume=resume, started_at=started_at, overwrite=overwrite, **overrides)
    cfg, world = p.cfg, p.world
    decision = decide(mode=cfg.mode, recipe=cfg.recipe, candidates=cfg.candidates, pretrained=p.info.pretrained,
                      task=p.task.name, distributed=world.active, native=native_size(p.ds.infos),
                      n_train=p.ds.split_sizes()["train"], budgeted=bool(cfg.time_limit))
    _warn(p, decision.notes)
    plan = shared_plan(world, lambda: plan_run(p.ds, cfg, p.backbone, p.info, decision.finetune, p.wall_start,
                                               cached=decision.cached, whole_check=decision.chosen))
    decision = whole_network(decision, plan.decisions.get("whole_network", {}).get("whole", False))
    plan = replace(plan, reasons=[*plan.reasons, *decision.reasons])
    info = replace(p.info, preprocessing=replace(p.info.preprocessing, size=plan.image_size))
    _announce(plan, p.run, world)
    t = Trained(Classifier(p.backbone, p.task.new_head(info.num_features, len(p.ds.classes), cfg), info.preprocessing),
                info, p.ds)
    if decision.head:
        t = head_stage(p, t)
        if decision.finetune:
            p, plan = _judge_orientation(p, t, plan)
    t_ft = time.perf_counter()
    if decision.finetune:
        plan, decision, t = _replan(p, t, decision, plan)
    if decision.finetune:
        t, plan = finetune_stage(p, t, decision, plan,
                                 decided=lambda race: write_json(p.run / "plan.json", {**plan.to_dict(), "race": race}))
        t.ft_s = time.perf_counter() - t_ft
        if plan.race:
            write_json(p.run / "plan.json", plan.to_dict())
    if not world.is_zero:  # rank 0 alone writes the run
        return RunResult(p.run, {}, p.run / "model", is_global_zero=False)
    return p.task.finish(p, t, plan)


def _judge_orientation(p: Prepared, t: Trained, plan: Plan) -> tuple[Prepared, Plan]:
    """With ``--augment auto`` (the default), whether the data has an up, recorded in the plan: fine-tuning
    turns and flips the images where it has none, and augments lightly where it has one."""
    check = orientation_stage(p, t) if p.cfg.augment == "auto" else None
    if check is None:
        return p, plan
    # printed with the plan, which is announced again before fine-tuning
    plan = replace(plan, decisions={**plan.decisions, "orientation": check.to_dict()})
    return replace(p, cfg=replace(p.cfg, augment="orient" if check.no_up else "light")), plan


def _replan(p: Prepared, t: Trained, decision: Decision, plan: Plan) -> tuple[Plan, Decision, Trained]:
    """The plan again before fine-tuning, on measured costs and the time left; when it leaves nothing to
    train, the fallback's choice (the head stage runs then if it had not)."""
    plan = shared_plan(p.world, lambda: plan_finetune(plan, t.ds, p.cfg, t.model, t.info, t.stats, p.wall_start,
                                                      cached=decision.cached))
    head_ran = decision.head
    decision, least_epochs, why = fallback(decision, plan.finetune, t.info.pretrained)
    if why is not None:
        plan = replace(plan, finetune=decision.finetune, epochs=max(plan.epochs, least_epochs),
                       reasons=[*plan.reasons, why])
    if decision.head and not head_ran:
        t = head_stage(p, t)
    if decision.candidates and decision.finetune:
        plan = with_race_estimate(plan, decision.candidates)
    _announce(plan, p.run, p.world)
    return plan, decision, t


def prepare(data: str | os.PathLike[str] | None, out: str | os.PathLike[str] | None, config: TrainConfig | None,
            *, resume: bool = False, started_at: float | None = None, overwrite: bool = False,
            **overrides: Any) -> Prepared:
    """The run's checked inputs: its options (a resumed run's own), the processes it shares, the scanned,
    split and audited data, the backbone with its weights; the run directory is written only once all of
    them are good (``train_config.json``, ``split.csv``, ``skipped.csv``)."""
    t_start, wall_start = time.perf_counter(), started_at or time.time()
    run = Path(out) if out is not None else default_run_dir()
    if resume:
        data, saved = _load_resume(run)
        cfg = replace(saved, **overrides).validate()
    else:
        if data is None:
            raise ConfigError("give the DATA folder to train on (or --resume RUN).")
        cfg = replace(config or TrainConfig(), **overrides).validate()
        _refuse_existing(run, overwrite)
    # several processes (--devices N --strategy ddp, torchrun, srun) share every stage; rank 0 writes
    devices, num_nodes = launch_layout(cfg.devices, cfg.num_nodes)
    cfg = replace(cfg, devices=devices, num_nodes=num_nodes)  # torchrun's or SLURM's layout, when it has one
    world = join(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy)
    if not world.is_zero:
        cfg = replace(cfg, quiet=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ds = split_dataset(scan(data, task=cfg.task), cfg.val, cfg.test, cfg.seed)
    task = task_for(ds.task)
    task.check(cfg)
    skipped = list(ds.skipped)
    report = audit(ds)  # the cheap part: exact duplicates, leakage, imbalance
    if cfg.dedupe:
        kept, removed = dedupe_across_splits(ds.samples, report.exact_duplicates)
        ds, skipped = replace(ds, samples=kept), skipped + removed
        report = audit(ds)
    if not any(s.split == "train" for s in ds.samples):
        raise DataError(f"no training images in '{data}' after splitting.")
    backbone, info = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights_file=cfg.weights,
                                     allow_download=cfg.allow_download, cut_stage=cfg.cut_stage,
                                     image_size=cfg.image_size)
    # data, backbone and weights are good: only now is anything of an earlier run replaced
    if world.is_zero:
        if overwrite and not resume:  # the old run's checkpoints and logs would mix in
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            shutil.rmtree(run / "logs", ignore_errors=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "logs").mkdir(exist_ok=True)
        if not resume:
            write_json(run / "train_config.json", {"data": str(Path(data).resolve()), "config": jsonable(asdict(cfg))})
        write_split_csv(ds.samples, run / "split.csv", ds.task)
        write_skipped_csv(skipped, run / "skipped.csv")
    if resume and (run / "plan.json").is_file():  # a resumed run keeps its input size
        cfg = replace(cfg, image_size=json.loads((run / "plan.json").read_text(encoding="utf-8"))["image_size"])
    p = Prepared(run=run, data=str(data), cfg=cfg, world=world, task=task, ds=ds, skipped=skipped, notes=[],
                 backbone=backbone, info=info, history=History(run / "logs" / "history.csv", "head"),
                 deadline=wall_start + cfg.time_limit if cfg.time_limit else None, resume=resume,
                 t_start=t_start, wall_start=wall_start)
    _warn(p, [*report.warnings, *cfg.ignored()])  # the data's problems and the options this run will not use
    return p


def _warn(p: Prepared, notes: Any) -> None:
    """Keep ``notes`` for the run's warnings and log them (rank 0)."""
    for note in notes:
        p.notes.append(note)
        if p.world.is_zero:
            log.warning(note)


def _load_resume(run: Path) -> tuple[str, TrainConfig]:
    path = run / "train_config.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume '{run}': it has no train_config.json (is it a transferlab run directory?).")
    saved = json.loads(path.read_text(encoding="utf-8"))
    return str(run / "split.csv"), TrainConfig(**config_from_dict(saved["config"], str(path), strict=False))


def _refuse_existing(run: Path, overwrite: bool) -> None:
    """A new run never writes into a folder that holds anything, unless ``overwrite`` is asked. Only the
    first process of a distributed run checks (the others start after it has written there)."""
    if overwrite or not run.exists() or not first_launched():
        return
    if not run.is_dir():
        raise ConfigError(f"--out '{run}' is a file; give a folder for the run.")
    if any(run.iterdir()):
        what = "a transferlab run" if (run / "train_config.json").is_file() else "files"
        raise ConfigError(f"--out '{run}' already holds {what}. Give a new folder, --overwrite to replace it, "
                          f"or --resume to continue it.")


def _announce(plan: Plan, run: Path, world: World = SINGLE) -> None:
    """Print the plan and keep it in the run directory (``plan.json``; ``metrics.json`` has it too); rank 0
    alone does."""
    if not world.is_zero:
        return
    emit("plan", lines=plan.describe(), estimate_s=plan.estimate.get("total"), budget_s=plan.budget_s)
    for line in plan.describe():
        log.info(line)
    write_json(run / "plan.json", plan.to_dict())
