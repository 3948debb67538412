"""The command line: argument parsing and printing only; every command calls the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape as esc
from rich.table import Table

from ..config import TrainConfig, duration_seconds, read_config_file
from ..training.recipes import recipe_names
from ..errors import ConfigError, TransferlabError
from .common import csv_ints, err, out, print_json, process_started_at, setup_logging, whole_names
from .data_commands import cache_app, data_app

_STARTED_AT = process_started_at()  # --time-limit counts from here: the user's clock, imports included
_D = TrainConfig()  # every default of train's options (and the default backbone) comes from here
ENGINE_OPTION = typer.Option(_D.engine, "--engine", help="What runs the frozen backbone's forward passes: auto (the "
                             "faster on this CPU, measured once and cached), torch or onnxruntime.")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a folder of labelled images into an image classifier by transfer learning.")
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")

@app.command()
def demo(out_dir: Path = typer.Option(Path("transferlab-demo"), "--out", help="Folder for data/ and run/."),
         mode: str = typer.Option("head", "--mode", help="head (about 30 s), or auto / finetune (fine-tunes "
                                  "the network: several minutes on a CPU)."),
         quiet: bool = typer.Option(False, "--quiet", "-q"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Build a real dataset (scikit-learn's digits), train, evaluate, report and predict."""
    from ..demo import run_demo

    setup_logging(quiet)
    res = run_demo(out_dir, quiet=quiet or as_json, mode=mode)
    test = res.metrics.get("test") or {}
    if as_json:
        print_json({"data": str(res.data_dir), "run": str(res.run_dir), "test_accuracy": test.get("accuracy"),
                     "examples": res.examples})
        return
    out.print(f"[bold]Data[/]: {esc(str(res.data_dir))} (scikit-learn digits as PNG class folders)")
    table = Table("image", "true", "predicted", "probability", title="A few test predictions")
    for e in res.examples:
        table.add_row(esc(Path(e["path"]).name), esc(str(e["true"])), esc(str(e["predicted"])), f"{e['probability']:.3f}")
    out.print(table)
    _summary(res.run_dir, res.metrics)


def _summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    test = metrics.get("test") or metrics.get("val") or {}
    timing = metrics.get("timing", {})
    if test.get("task") == "multilabel":
        out.print(f"[bold green]done[/]: test mAP {test.get('mAP') or 0:.4f}, micro-F1 {test.get('micro_f1'):.4f}, "
                  f"macro-F1 {test.get('macro_f1') or 0:.4f} in {timing.get('total_s', 0):.1f}s -> "
                  f"{esc(str(run_dir))}/ (open {esc(str(run_dir))}/report.html)")
        return
    acc, ci = test.get("accuracy"), test.get("accuracy_ci")
    acc_s = f"{acc:.4f}" if acc is not None else "n/a"
    if acc is not None and ci:
        acc_s += f" (95% {ci[0]:.3f}-{ci[1]:.3f})"
    out.print(f"[bold green]done[/]: test accuracy {acc_s}, macro-F1 {test.get('macro_f1') or 0:.4f} "
              f"in {timing.get('total_s', 0):.1f}s -> {esc(str(run_dir))}/ (open {esc(str(run_dir))}/report.html)")


@app.command()
def backbones(offline: bool = typer.Option(False, "--offline", help="Only backbones usable with no network."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """List backbones: parameters, input size, ImageNet top-1, offline availability."""
    from ..backbones.catalog import list_backbones

    rows = list_backbones(offline_only=offline)
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    table = Table("name", "timm model", "params (M)", "input", "ImageNet top-1", "offline", "weights from")
    for r in rows:
        table.add_row(r.name, r.timm_name, f"{r.params_m:.2f}", str(r.input_size),
                      f"{r.imagenet_top1:.2f}" if r.imagenet_top1 else "—", "yes" if r.offline else "no", r.source)
    out.print(whole_names(table, 0))
    out.print("Any timm model name also works as --backbone (weights from the cache, or --allow-download).")


@app.command()
def imagenet(images: list[Path] = typer.Argument(..., help="Image files."),
             backbone: str = typer.Option(_D.backbone, "--backbone", "-b"),
             top_k: int = typer.Option(5, "--top-k", "-k"), weights: Optional[Path] = typer.Option(None, "--weights"),
             allow_download: bool = typer.Option(False, "--allow-download"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Classify images with the pretrained network itself (ImageNet labels)."""
    from ..imagenet import classify_imagenet

    results = classify_imagenet([str(p) for p in images], backbone, top_k, weights_file=str(weights) if weights else None,
                                allow_download=allow_download or None)
    if as_json:
        print_json(results)
        return
    for r in results:
        if r.get("error"):
            out.print(f"[red]{esc(str(r['path']))}[/]: {esc(str(r['error']))}")
            continue
        preds = ", ".join(f"{p['label']} ({p['probability']:.3f})" for p in r["predictions"])
        out.print(f"[bold]{esc(str(r['path']))}[/]: {esc(preds)}")


def parse_duration(text: Optional[str]) -> Optional[float]:
    """'15m', '90s', '1h30m', '2h' or plain seconds -> seconds (``None`` stays ``None``)."""
    if text is None:
        return None
    try:
        return duration_seconds(text)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


#: How a train option's command-line value becomes its TrainConfig field's (the rest are taken as they are).
_FROM_FLAG = {
    "head": csv_ints, "top_k": csv_ints, "time_limit": parse_duration,
    "candidates": lambda v: tuple(c.strip() for c in v.split(",") if c.strip()) if v else (),
    "grad_clip": lambda v: v or None, "allow_download": lambda v: v or None,
    "weights": lambda v: str(v) if v else None, "cache_dir": lambda v: str(v) if v else None,
}
#: The train command's parameters that are not TrainConfig fields.
_RUN_PARAMS = ("data", "out_dir", "resume", "overwrite", "config_file", "as_json")


def _train_options(ctx: typer.Context, file_options: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The run's TrainConfig fields from the flags (each parameter is named after its field), with the
    ``--config`` file's values wherever the flag was not given; and the names of the flags given."""
    # typer may bring its own copy of click, so the parameter source is compared by name
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}
    options = {name: _FROM_FLAG.get(name, lambda v: v)(value) for name, value in ctx.params.items()
               if name not in _RUN_PARAMS}
    options.update({k: v for k, v in file_options.items() if k not in given})
    return options, given


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    data: Optional[Path] = typer.Argument(None, help="Class folders, train/val/test folders, or a CSV manifest."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<date>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (refused without it)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of train options by field "
                                               "name (a run's train_config.json too); flags given here win."),
    backbone: str = typer.Option(_D.backbone, "--backbone", "-b"),
    mode: str = typer.Option(_D.mode, "--mode", help="head (cached features), knn (nearest class prototype, no "
                             "training), finetune (end to end) or auto (head, then fine-tune)."),
    task: str = typer.Option(_D.task, "--task", help="auto (from the data), single or multilabel (any number of "
                             "labels per image: a manifest's labels separated by ';', or one image in several "
                             "class folders)."),
    head: Optional[str] = typer.Option(None, "--head", help="MLP head widths, e.g. 1024,1024 (default linear)."),
    dropout: float = typer.Option(_D.dropout, "--dropout"),
    epochs: int = typer.Option(_D.epochs, "--epochs", help="Head phase: at most; early stopping ends sooner."),
    lr: float = typer.Option(_D.lr, "--lr", help="Head phase learning rate."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Head phase batch size."),
    patience: int = typer.Option(_D.patience, "--patience", help="Head phase early-stopping patience (epochs)."),
    ft_epochs: int = typer.Option(_D.ft_epochs, "--ft-epochs", help="Fine-tuning epochs at most (with --time-limit the plan may choose fewer)."),
    ft_lr: float = typer.Option(_D.ft_lr, "--ft-lr", help="Fine-tuning rate of the head and the top stage; the stem gets 1/100 of it."),
    ft_batch_size: int = typer.Option(_D.ft_batch_size, "--ft-batch-size"),
    ft_patience: int = typer.Option(_D.ft_patience, "--ft-patience"),
    ft_label_smoothing: float = typer.Option(_D.ft_label_smoothing, "--ft-label-smoothing",
                                             help="Fine-tuning's label smoothing (single-label)."),
    freeze_epochs: int = typer.Option(_D.freeze_epochs, "--freeze-epochs", help="Frozen-backbone epochs when fine-tuning without a head phase."),
    unfreeze: str = typer.Option(_D.unfreeze, "--unfreeze", help="'all' or the number of top stages to train."),
    frozen_stride: int = typer.Option(_D.frozen_stride, "--frozen-stride", help="Pretrained stages at this output stride or "
                                      "finer stay frozen when fine-tuning (0: train them too)."),
    augment: str = typer.Option(_D.augment, "--augment",
                                help="auto, none, light, strong or orient (flips and 90-degree turns) in fine-tuning; "
                                     "auto: light, or orient where the head finds the data has no up."),
    recipe: str = typer.Option(_D.recipe, "--recipe",
                               help="race: race a few training recipes on validation and give the winner the rest "
                                    "of the budget; single: the one fine-tuning recipe."),
    candidates: Optional[str] = typer.Option(None, "--candidates",
                                             help="Recipes to race, comma-separated (default: chosen from the data): "
                                                  f"{', '.join(recipe_names())}."),
    ft_mixup: str = typer.Option(_D.ft_mixup, "--mixup",
                                 help="auto, on or off: MixUp and CutMix in fine-tuning (auto: on for a pretrained "
                                      "network's schedule of 5 epochs or more)."),
    ft_drop_path: float = typer.Option(_D.ft_drop_path, "--drop-path",
                                       help="Stochastic depth in fine-tuning: the rate at the deepest residual block, "
                                            "rising linearly from 0 at the first (timm's rule)."),
    aug_views: int = typer.Option(_D.aug_views, "--aug-views", help="Head mode: cache K augmented views per training image."),
    balance: str = typer.Option(_D.balance, "--balance", help="none, weights (loss weighted by inverse class "
                                "frequency) or sampler (classes drawn evenly)."),
    label_smoothing: float = typer.Option(_D.label_smoothing, "--label-smoothing", help="Head phase."),
    weight_decay: float = typer.Option(_D.weight_decay, "--weight-decay"),
    grad_clip: float = typer.Option(_D.grad_clip or 0.0, "--grad-clip", help="Gradient norm clip in fine-tuning (0: off)."),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="e.g. 15m: stop in time, best model saved."),
    seed: int = typer.Option(_D.seed, "--seed"),
    val: float = typer.Option(_D.val, "--val", help="Validation fraction when not pre-split."),
    test: float = typer.Option(_D.test, "--test", help="Test fraction when not pre-split."),
    cut_stage: Optional[int] = typer.Option(None, "--cut-stage", help="Keep only the first N backbone stages."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    pretrained: bool = typer.Option(_D.pretrained, "--pretrained/--no-pretrained",
                                    help="ImageNet weights, or random init."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Explicit pretrained weights file."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow fetching weights from the hub."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir"),
    no_cache: bool = typer.Option(_D.no_cache, "--no-cache"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding processes."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (inference)."),
    accelerator: str = typer.Option(_D.accelerator, "--accelerator", help="Lightning accelerator for fine-tuning."),
    devices: int = typer.Option(_D.devices, "--devices", help="Devices (or CPU processes) for fine-tuning."),
    strategy: str = typer.Option(_D.strategy, "--strategy", help="Lightning strategy, e.g. ddp."),
    num_nodes: int = typer.Option(_D.num_nodes, "--num-nodes"),
    mixed_precision: bool = typer.Option(_D.mixed_precision, "--amp/--no-amp",
                                         help="Mixed precision (bf16 on CPU, AMP on CUDA)."),
    engine: str = ENGINE_OPTION,
    top_k: str = typer.Option(",".join(map(str, _D.top_k)), "--top-k", help="Top-k accuracies to report, e.g. 1,3,5."),
    dedupe: bool = typer.Option(_D.dedupe, "--dedupe", help="Remove exact duplicates across splits from val/test."),
    diagnose: bool = typer.Option(_D.diagnose, "--diagnose/--no-diagnose",
                                  help="Label issues and learning curve of the training split (<= 5,000 images)."),
    quiet: bool = typer.Option(_D.quiet, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train a classifier: split, extract/cache features, train, fine-tune, evaluate, save."""
    from ..pipeline import train

    setup_logging(quiet)
    file_options = read_config_file(config_file) if config_file is not None and resume is None else {}
    options, given = _train_options(ctx, file_options)
    options["quiet"] = options["quiet"] or as_json
    if resume is not None:
        kept = ("resume", "time_limit", "quiet", "as_json")  # what --resume takes; the run keeps its own options
        ignored = [p.opts[0] for p in ctx.command.params if p.name in given and p.name not in kept]
        if ignored:
            err.print(f"[yellow]warning[/]: ignored with --resume (the run keeps its own data and options): "
                      f"{esc(', '.join(ignored))}")
        overrides = {"quiet": quiet or as_json}
        if time_limit is not None:
            overrides["time_limit"] = parse_duration(time_limit)
        res = train(None, resume, resume=True, started_at=_STARTED_AT, **overrides)
    else:
        res = train(data, out_dir, started_at=_STARTED_AT, overwrite=overwrite, **options)
    if not res.is_global_zero:
        return
    if as_json:
        print_json({"run": str(res.run_dir), "model": str(res.model_dir), "metrics": res.metrics})
    else:
        for w in res.warnings:
            err.print(f"[yellow]warning[/]: {w}")
        _summary(res.run_dir, res.metrics)


@app.command("evaluate")
def evaluate_cmd(model: Path = typer.Argument(..., help="Model directory (RUN/model)."),
                 data: Path = typer.Argument(..., help="Labelled folder or manifest."),
                 out_dir: Path = typer.Option(..., "--out"),
                 split: Optional[str] = typer.Option(None, "--split", help="Only this split of pre-split data."),
                 engine: str = ENGINE_OPTION,
                 quiet: bool = typer.Option(False, "--quiet", "-q"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Metrics, plots and report for a saved model on a labelled folder."""
    from ..evaluate import evaluate

    setup_logging(quiet)
    metrics = evaluate(model, data, out_dir, split=split, engine=engine)
    if as_json:
        print_json(metrics)
    else:
        _summary(out_dir, metrics)


@app.command()
def predict(model: Path = typer.Argument(..., help="Model directory (RUN/model)."),
            paths: list[Path] = typer.Argument(..., help="Image files or folders."),
            top_k: int = typer.Option(3, "--top-k", "-k"),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write .csv or .json."),
            threshold: Optional[float] = typer.Option(None, "--threshold", help="Label 'unknown' below this top "
                                                      "probability; multi-label: every label's threshold (default: "
                                                      "each label's, tuned on validation)."),
            tta: bool = typer.Option(False, "--tta", help="Average the image and its mirror."),
            open_set: bool = typer.Option(False, "--open-set", help="Label 'unknown' the images unlike every "
                                          "class (distance to the training images; calibrated to accept 95% of "
                                          "validation images)."),
            no_calibration: bool = typer.Option(False, "--no-calibration", help="Ignore the fitted temperature."),
            engine: str = ENGINE_OPTION,
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Predict labels for image files and folders (unreadable files are reported, not fatal)."""
    from ..distributed import join, launch_layout
    from ..predict import expand_paths, load_model, write_predictions
    from ..sharing import predict_shared

    if threshold is not None and not 0 <= threshold <= 1:
        raise typer.BadParameter(f"--threshold {threshold}: expected a probability between 0 and 1")
    devices, num_nodes = launch_layout()  # torchrun's or srun's layout: each rank predicts a share
    world = join(devices=devices, num_nodes=num_nodes)
    predictor = load_model(model, engine=engine)
    if not as_json and world.is_zero:
        err.print(predictor.choice.line())
    results = predict_shared(predictor, expand_paths(paths), world, top_k=top_k, threshold=threshold, tta=tta,
                             calibrated=not no_calibration, open_set=open_set)
    if not world.is_zero:  # rank 0 writes the one output file
        return
    if output is not None:
        write_predictions(results, output)
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    table = Table("file", "label", "probability", f"top-{top_k}")
    for r in results:
        if r.error:
            table.add_row(esc(str(r.source)), "[red]error[/]", "", esc(str(r.error)))
        else:
            label = "(no label)" if r.labels == [] else r.label
            table.add_row(esc(str(r.source)), esc(str(label)), f"{r.probability:.3f}",
                          esc(", ".join(f"{t['label']} {t['probability']:.2f}" for t in r.top_k)))
    out.print(table)
    n_err = sum(1 for r in results if r.error)
    if n_err:
        err.print(f"{n_err} file(s) could not be read (see the error column).")


@app.command("lr-find")
def lr_find_cmd(data: Path = typer.Argument(..., help="Labelled folder or manifest."),
                out_dir: Path = typer.Option(Path("."), "--out", help="Folder for lr_find.png."),
                backbone: str = typer.Option(_D.backbone, "--backbone", "-b"),
                seed: int = typer.Option(0, "--seed"), quiet: bool = typer.Option(False, "--quiet", "-q"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Learning-rate finder on the head (cached features): writes the loss-vs-rate plot, prints a suggestion."""
    from ..diagnostics.dataset import lr_find

    setup_logging(quiet)
    res = lr_find(data, out_dir, backbone=backbone, seed=seed, quiet=quiet or as_json)
    if as_json:
        print_json({"suggestion": res.suggestion, "plot": str(Path(out_dir) / "lr_find.png")})
    else:
        sug = f"{res.suggestion:.2e}" if res.suggestion else "none (loss never fell)"
        out.print(f"suggested head learning rate: [bold]{sug}[/] (plot: {esc(str(Path(out_dir) / 'lr_find.png'))})")


@app.command("compare")
def compare_cmd(data: Path = typer.Argument(..., help="Labelled folder or manifest."),
                backbones_: str = typer.Option("efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,simple_cnn",
                                               "--backbones", help="Comma-separated backbone names."),
                out_dir: Path = typer.Option(Path("compare"), "--out"),
                mode: str = typer.Option(_D.mode, "--mode", help="head, knn or auto (simple_cnn always trains from scratch)."),
                time_limit: Optional[str] = typer.Option(None, "--time-limit", help="Budget per backbone, e.g. 5m."),
                ft_epochs: int = typer.Option(_D.ft_epochs, "--ft-epochs"), image_size: Optional[int] = typer.Option(None, "--image-size"),
                seed: int = typer.Option(_D.seed, "--seed"), quiet: bool = typer.Option(False, "--quiet", "-q"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Train several backbones on the same split; write compare.csv and compare.html."""
    from ..compare import compare

    setup_logging(quiet)
    names = [b.strip() for b in backbones_.split(",") if b.strip()]
    rows = compare(data, names, out_dir, mode=mode, time_limit=parse_duration(time_limit), seed=seed,
                   quiet=quiet or as_json, ft_epochs=ft_epochs, image_size=image_size)
    if as_json:
        print_json(rows)
        return
    table = Table("backbone", "status", "accuracy (95%)", "p vs best", "macro-F1", "train s", "latency ms",
                  "params M", "MB")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["backbone"], "skipped", "", "", "", "", "", "", r.get("reason", "")[:60])
        else:
            p = r.get("p_vs_best")
            table.add_row(r["backbone"], "ok", f"{r['accuracy']:.4f} ({r['accuracy_ci']})",
                          "best" if p is None else f"{p:.3g}", f"{r['macro_f1']:.4f}", str(r["train_s"]),
                          str(r["latency_ms"]), str(r["params_m"]), str(r["artifact_mb"]))
    out.print(whole_names(table, 0))
    out.print("p vs best: McNemar's exact test on the same test images; above 0.05 the difference from the best "
              "may be chance.")
    out.print(f"wrote {out_dir}/compare.csv and {out_dir}/compare.html")


@app.command("diff")
def diff_cmd(run_a: Path = typer.Argument(..., help="First run (or evaluate) directory."),
             run_b: Path = typer.Argument(..., help="Second run directory, on the same test split."),
             out_dir: Path = typer.Option(Path("diff"), "--out", help="Folder for diff.html, diff.csv, diff.json."),
             top: int = typer.Option(20, "--top", help="Changed images to print."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """The test images whose prediction changed between two runs, and per-class deltas with intervals."""
    from ..evaluation.diff import diff_runs, write_diff

    d = diff_runs(run_a, run_b)
    page = write_diff(d, out_dir)
    if as_json:
        print_json(d.to_dict())
        return
    table = Table("class", "images", "recall A", "recall B", "B - A (95%)", "fixed", "broken")
    for c in d.per_class:
        ci = c["delta_ci"]
        table.add_row(esc(c["class"]), str(c["n"]), f"{c['recall_a']:.3f}", f"{c['recall_b']:.3f}",
                      f"{100 * c['delta']:+.1f}" + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else ""),
                      str(c["fixed"]), str(c["broken"]))
    out.print(table)
    changes = Table("image", "true", "A", "B", "change", title=f"changed predictions ({len(d.changed)})")
    for r in d.changed[:top]:
        changes.add_row(esc(r["path"]), esc(r["true"]), esc(r["pred_a"]), esc(r["pred_b"]), r["change"])
    out.print(changes)
    m = d.mcnemar
    out.print(f"{d.n_common} common test images: accuracy A {d.accuracy_a:.4f}, B {d.accuracy_b:.4f}; "
              f"McNemar p = {m['p_value']:.3g} ({m['only_b_right']} only B right, {m['only_a_right']} only A right)."
              f" Page: {esc(str(page))}")
    if d.only_in_a or d.only_in_b:
        err.print(f"[yellow]warning[/]: the test splits differ ({d.only_in_a} image(s) only in A, "
                  f"{d.only_in_b} only in B); compared on the common ones.")


@app.command("add-class")
def add_class_cmd(model: Path = typer.Argument(..., help="Model directory (RUN/model)."),
                  folder: Path = typer.Argument(..., help="Folder of images of the new class."),
                  name: Optional[str] = typer.Option(None, "--name", help="Class name (default: the folder's name)."),
                  seed: int = typer.Option(0, "--seed"), quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Add a class to a knn or linear-head model in seconds (no fine-tuning); the old model is kept as a backup."""
    from ..classes import add_class

    setup_logging(quiet)
    ch = add_class(model, folder, name, seed=seed, quiet=quiet)
    val = f"; val accuracy {ch.val_accuracy:.4f}" if ch.val_accuracy is not None else ""
    out.print(f"added: {esc(ch.how)} in {ch.seconds:.1f}s{val}. Classes: {esc(', '.join(ch.classes))}. "
              f"Previous model: {esc(str(ch.backup))}")


@app.command("remove-class")
def remove_class_cmd(model: Path = typer.Argument(..., help="Model directory (RUN/model)."),
                     name: str = typer.Argument(..., help="The class to remove.")) -> None:
    """Remove a class from a model (its row of the last layer); the old model is kept as a backup."""
    from ..classes import remove_class

    ch = remove_class(model, name)
    out.print(f"removed '{esc(name)}'. Classes: {esc(', '.join(ch.classes))}. Previous model: {esc(str(ch.backup))}")


@app.command()
def explain(model: Path = typer.Argument(..., help="Model directory."), image: Path = typer.Argument(...),
            out_path: Path = typer.Option(Path("heat.png"), "--out"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Write the Grad-CAM overlay of where the network looked for its prediction."""
    from ..predict import explain as run_explain

    res = run_explain(model, image, out_path)
    if as_json:
        print_json(res)
    else:
        out.print(f"{image}: {res['label']} ({res['probability']:.3f}); heat map -> {out_path}")


@app.command()
def summary(model: Path = typer.Argument(..., help="Model directory."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Backbone, stages, parameters, input size, classes and training summary of a saved model."""
    from ..artifacts import model_summary

    info = model_summary(model)
    if as_json:
        print_json(info)
        return
    table = Table("item", "value", title=f"model {model}")
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    out.print(table)


@app.command()
def studio(project: Path = typer.Argument(Path("."), help="Project folder (created if missing): data/<class>/ and runs/."),
           host: str = typer.Option("127.0.0.1", "--host", help="Beyond loopback an --api-key is required."),
           port: int = typer.Option(8000, "--port"),
           api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TRANSFERLAB_API_KEY",
                                                 help="Key the page asks for (and API clients send as Bearer).")) -> None:
    """The whole job in a browser page: classes, pictures (files, folders, webcam), training, results, export."""
    from ..studio import run_studio

    out.print(f"transferlab studio: open http://{host}:{port}/ in a browser (project {esc(str(project.resolve()))})")
    run_studio(project, host=host, port=port, api_key=api_key)


@app.command()
def serve(model: Path = typer.Argument(..., help="Model directory or exported .onnx file."),
          host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 exposes the service to the network."),
          port: int = typer.Option(8000, "--port"), workers: int = typer.Option(1, "--workers"),
          max_bytes: int = typer.Option(20 * 1024 * 1024, "--max-bytes", help="Largest request body."),
          max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image (decompression bombs)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TRANSFERLAB_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on every endpoint but /health."),
          open_set: bool = typer.Option(False, "--open-set", help="Answer 'unknown' for images unlike every class."),
          engine: str = ENGINE_OPTION) -> None:
    """HTTP API (POST /predict, GET /health, /labels, /docs) and a web page at /."""
    from ..service.app import serve as run_service

    run_service(model, host=host, port=port, workers=workers, max_bytes=max_bytes, max_pixels=max_pixels,
                api_key=api_key, open_set=open_set, engine=engine)


@app.command("export")
def export_cmd(model: Path = typer.Argument(..., help="Model directory."),
               fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
               int8: bool = typer.Option(False, "--int8", help="ONNX Runtime static int8 quantization."),
               out_path: Optional[Path] = typer.Option(None, "--out", help="Output file (default inside MODEL)."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Export a model and check it against the original (fails if the check fails)."""
    from ..export import describe_int8, export_model

    check = export_model(model, fmt, out_path, int8=int8)
    if as_json:
        print_json(check)
        return
    figures = (describe_int8(check["test"]) if check.get("int8") else
               f"max |p - p_torch| = {check['max_abs_diff']:.2e}, agreement of {check.get('agreement_of', 'the top-1 class')} "
               f"{100 * check['top1_agreement']:.1f}%")
    out.print(f"[bold green]exported[/] {esc(str(check['file']))} ({check['bytes'] / 1e6:.1f} MB), checked on "
              f"{check['checked_on']}: {figures} ({check['criterion']}: passed)")
    if "precision" in check:
        out.print(check["precision"])


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app; a TransferlabError is printed without a traceback (exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except TransferlabError as exc:
        err.print(f"[bold red]error[/]: {esc(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except typer.Abort:
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:
        # click's usage errors, shown as click shows them (typer may bring its own copy of click, so they
        # are recognised by what they have, not by their class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return 0
