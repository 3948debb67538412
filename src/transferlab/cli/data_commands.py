"""The ``data`` and ``cache`` command groups (argument parsing only; they call the library)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape as esc
from rich.table import Table

from ..config import DEFAULT_BACKBONE
from .common import print_json, setup_logging, err, out

__all__ = ["data_app", "cache_app"]

cache_app = typer.Typer(no_args_is_help=True, help="Show or free the feature cache.")
data_app = typer.Typer(no_args_is_help=True, help="Audit, split and import datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import datasets as class folders.")
data_app.add_typer(import_app, name="import")


# options the commands that read a dataset's features share
_DATA = typer.Argument(..., help="Labelled folder or manifest.")
_BACKBONE = typer.Option(DEFAULT_BACKBONE, "--backbone", "-b")
_SEED = typer.Option(0, "--seed")
_CACHE_DIR = typer.Option(None, "--cache-dir")
_QUIET = typer.Option(False, "--quiet", "-q")
_JSON = typer.Option(False, "--json")


@data_app.command("check")
def data_check(data: Path = _DATA,
               near: bool = typer.Option(True, "--near/--no-near", help="Near-duplicates from backbone features."),
               threshold: float = typer.Option(0.97, "--threshold", help="Cosine similarity for near-duplicates."),
               backbone: str = _BACKBONE, cache_dir: Optional[Path] = _CACHE_DIR, quiet: bool = _QUIET,
               as_json: bool = _JSON) -> None:
    """Audit a dataset: counts, unreadable and converted files, duplicates, leakage, imbalance."""
    from ..diagnostics.dataset import check_dataset

    setup_logging(quiet)
    rep = check_dataset(data, near=near, backbone=backbone, threshold=threshold,
                        cache_dir=str(cache_dir) if cache_dir else None, quiet=quiet or as_json)
    if as_json:
        print_json(rep.to_dict())
        return
    splits = sorted({s for c in rep.counts.values() for s in c})
    table = Table("class", *splits, "total", title=f"dataset {data}")
    for name, c in rep.counts.items():
        table.add_row(esc(name), *(str(c.get(s, 0)) for s in splits), str(sum(c.values())))
    out.print(table)
    for title, rows, fmt in (("unreadable files", rep.unreadable, lambda r: f"{r['path']}: {r['reason']}"),
                             ("converted on load", rep.converted, lambda r: f"{r['path']}: {'; '.join(r['conversions'])}"),
                             ("very small images", rep.small, lambda r: f"{r['path']}: {r['size'][0]}x{r['size'][1]}"),
                             ("exact duplicates", rep.exact_duplicates,
                              lambda g: f"[{g['kind']}] " + ", ".join(f"{f['path']} ({f['label']}/{f['split']})" for f in g["files"])),
                             ("near-duplicates", rep.near_duplicates,
                              lambda g: f"[{g['kind']}, {g['similarity']:.3f}] " + ", ".join(f"{f['path']} ({f['label']}/{f['split']})" for f in g["files"]))):
        out.print(f"[bold]{title}[/]: {len(rows)}")
        for r in rows[:20]:
            out.print("  " + fmt(r), highlight=False, markup=False)
        if len(rows) > 20:
            out.print(f"  ... and {len(rows) - 20} more (--json for all)")
    out.print(f"[bold]imbalance[/]: largest/smallest class = {rep.imbalance.get('ratio')}")
    for w in rep.warnings:
        err.print(f"[yellow]warning[/]: {esc(w)}")


@data_app.command("issues")
def data_issues_cmd(data: Path = _DATA,
                    out_dir: Path = typer.Option(Path("."), "--out", help="Folder for label_issues.csv and .html."),
                    backbone: str = _BACKBONE,
                    folds: int = typer.Option(5, "--folds", help="Cross-validation folds for out-of-sample probabilities."),
                    seed: int = _SEED, cache_dir: Optional[Path] = _CACHE_DIR,
                    top: int = typer.Option(20, "--top", help="Rows to print."),
                    quiet: bool = _QUIET, as_json: bool = _JSON) -> None:
    """Find probable label errors, outliers and conflicting near-duplicates (cached features, seconds)."""
    from ..diagnostics import data_issues

    if folds < 2:
        raise typer.BadParameter(f"--folds {folds}: expected at least 2")
    setup_logging(quiet)
    issues = data_issues(data, out_dir, backbone=backbone, seed=seed, folds=folds,
                         cache_dir=str(cache_dir) if cache_dir else None, quiet=quiet or as_json)
    if as_json:
        print_json({"summary": issues.summary(), "rows": issues.rows})
        return
    s = issues.summary()
    table = Table("file", "given", "suggested", "score", "reason", title=f"label issues in {esc(str(data))}")
    for r in issues.rows[:top]:
        table.add_row(esc(Path(r["path"]).name), esc(r["given_label"]), esc(r["suggested_label"]),
                      f"{r['score']:.3f}", esc(r["reason"]))
    out.print(table)
    out.print(f"{s['images']} images in {s['seconds']:.1f}s: {s['suspected_label_errors']} suspected label error(s), "
              f"{s['outliers']} outlier(s), {s['conflicting_near_duplicates']} conflicting near-duplicate(s). "
              f"All rows: {esc(str(out_dir / 'label_issues.csv'))}; thumbnails: {esc(str(out_dir / 'label_issues.html'))}")


@data_app.command("curve")
def data_curve_cmd(data: Path = _DATA,
                   out_dir: Path = typer.Option(Path("."), "--out", help="Folder for learning_curve.png and .json."),
                   backbone: str = _BACKBONE,
                   seeds: int = typer.Option(3, "--seeds", help="Random subsets per training share."),
                   seed: int = _SEED, cache_dir: Optional[Path] = _CACHE_DIR, quiet: bool = _QUIET,
                   as_json: bool = _JSON) -> None:
    """Do I need more data? Head accuracy against 10-100% of the training split, projected to 2x and 4x."""
    from ..diagnostics import data_curve

    if seeds < 1:
        raise typer.BadParameter(f"--seeds {seeds}: expected at least 1")
    setup_logging(quiet)
    curve = data_curve(data, out_dir, backbone=backbone, seed=seed, seeds=seeds,
                       cache_dir=str(cache_dir) if cache_dir else None, quiet=quiet or as_json)
    if as_json:
        print_json(curve.to_dict())
        return
    table = Table("training images", "share", f"accuracy ({curve.scored_on})", "± (seeds)")
    for n, f, a, sd in zip(curve.n_train, curve.fractions, curve.accuracy, curve.accuracy_std):
        table.add_row(str(n), f"{100 * f:.0f}%", f"{a:.4f}", f"{sd:.4f}")
    out.print(table)
    for line in curve.sentences():
        out.print(esc(line))
    out.print(f"computed in {curve.seconds:.1f}s from cached features; plot: {esc(str(out_dir / 'learning_curve.png'))}")


@data_app.command("relabel")
def data_relabel_cmd(data: Path = typer.Argument(..., help="The dataset folder (or manifest) the issues came from."),
                     issues_csv: Path = typer.Argument(..., help="label_issues.csv with accepted rows."),
                     apply: bool = typer.Option(False, "--apply", help="Make the changes (default: only list them)."),
                     accept_all: bool = typer.Option(False, "--all", help="Accept every row with a suggested label.")) -> None:
    """Move accepted files to their suggested class folder (or write a corrected manifest); never deletes."""
    from ..data.relabel import apply_relabel, plan_relabel
    from ..diagnostics.label_issues import read_issues_csv

    moves = plan_relabel(data, read_issues_csv(issues_csv), accept_all=accept_all)
    if not moves:
        out.print("no accepted rows: put 'yes' in the accept column of the rows to apply, or use --all.")
        return
    table = Table("file", "from", "to", "status")
    for m in moves:
        table.add_row(esc(m.path), esc(m.given), esc(m.label), esc(m.problem) if m.problem else
                      (f"-> {esc(str(m.dest))}" if m.dest else "relabel in manifest"))
    out.print(table)
    ok = sum(1 for m in moves if not m.problem)
    if not apply:
        out.print(f"dry run: {ok} change(s) would be made; add --apply to make them.")
        return
    log_path = issues_csv.parent / "relabel_log.csv"
    written = apply_relabel(data, moves, log_path)
    where = f"; corrected manifest {esc(str(written))}" if written else ""
    out.print(f"made {ok} change(s){where}; logged in {esc(str(log_path))}")


@data_app.command("split")
def data_split(data: Path = typer.Argument(...), out_path: Path = typer.Option(Path("split.csv"), "--out"),
               val: float = typer.Option(0.15, "--val"), test: float = typer.Option(0.15, "--test"),
               seed: int = typer.Option(0, "--seed")) -> None:
    """Write the stratified, seeded split of a dataset as split.csv (path,label,split)."""
    from ..data.scan import scan as scan_data
    from ..data.split import split_dataset, write_split_csv

    ds = split_dataset(scan_data(data), val, test, seed)
    write_split_csv(ds.samples, out_path, ds.task)
    n = {s: sum(1 for x in ds.samples if x.split == s) for s in ("train", "val", "test")}
    out.print(f"wrote {esc(str(out_path))}: {n['train']} train, {n['val']} val, {n['test']} test; {len(ds.skipped)} skipped")


@import_app.command("cifar10")
def import_cifar10(source: str = typer.Argument(..., help="cifar-10-python.tar.gz"), out_dir: Path = typer.Option(..., "--out"),
                   allow_download: bool = typer.Option(False, "--allow-download")) -> None:
    """CIFAR-10 python archive -> OUT/{train,test}/<class>/*.png."""
    _import_cifar("cifar10", source, out_dir, allow_download)


@import_app.command("cifar100")
def import_cifar100(source: str = typer.Argument(..., help="cifar-100-python.tar.gz"), out_dir: Path = typer.Option(..., "--out"),
                    allow_download: bool = typer.Option(False, "--allow-download")) -> None:
    """CIFAR-100 python archive (fine labels) -> OUT/{train,test}/<class>/*.png."""
    _import_cifar("cifar100", source, out_dir, allow_download)


def _import_cifar(kind: str, source: str, out_dir: Path, allow_download: bool) -> None:
    from ..data.imports import import_cifar

    counts = import_cifar(kind, source, out_dir, allow_download=allow_download)
    out.print(f"wrote {kind} to {esc(str(out_dir))}: {counts}")


def _import_idx(kind: str, source: Path, out_dir: Path, per_class: Optional[int], val_per_class: int,
                seed: int) -> None:
    from ..data.imports import import_idx

    counts = import_idx(kind, source, out_dir, train_per_class=per_class, val_per_class=val_per_class, seed=seed)
    out.print(f"wrote {kind} to {esc(str(out_dir))}: {counts}")


_IDX_SOURCE = typer.Argument(..., help="Folder with the four IDX files (e.g. /usr/share/datasets/fashion-mnist).")
_PER_CLASS = typer.Option(None, "--per-class", help="Keep N training images per class (seeded); default all.")
_VAL_PER_CLASS = typer.Option(0, "--val-per-class", help="Hold out N training images per class as val/ (seeded).")


@import_app.command("fashion-mnist")
def import_fashion_mnist(source: Path = _IDX_SOURCE, out_dir: Path = typer.Option(..., "--out"),
                         per_class: Optional[int] = _PER_CLASS, val_per_class: int = _VAL_PER_CLASS,
                         seed: int = typer.Option(0, "--seed")) -> None:
    """Fashion-MNIST IDX files -> OUT/{train,[val,]test}/<class>/*.png."""
    _import_idx("fashion-mnist", source, out_dir, per_class, val_per_class, seed)


@import_app.command("mnist")
def import_mnist(source: Path = _IDX_SOURCE, out_dir: Path = typer.Option(..., "--out"),
                 per_class: Optional[int] = _PER_CLASS, val_per_class: int = _VAL_PER_CLASS,
                 seed: int = typer.Option(0, "--seed")) -> None:
    """MNIST IDX files -> OUT/{train,[val,]test}/<class>/*.png."""
    _import_idx("mnist", source, out_dir, per_class, val_per_class, seed)


@import_app.command("csv")
def import_csv(manifest: Path = typer.Argument(..., help="path,label[,split] CSV"), out_dir: Path = typer.Option(..., "--out")) -> None:
    """Copy the images of a CSV manifest into class folders."""
    from ..data.imports import import_manifest

    res = import_manifest(manifest, out_dir)
    out.print(f"copied {res['copied']} images into {esc(str(out_dir))}; {res['skipped']} skipped")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Show what the feature cache holds."""
    from ..features.cache import FeatureCache

    cache = FeatureCache(cache_dir)
    infos = cache.info()
    if as_json:
        print_json({"root": str(cache.root), "namespaces": [i.__dict__ for i in infos]})
        return
    table = Table("namespace", "backbone", "view", "features", "MB", title=f"feature cache: {cache.root}")
    for i in infos:
        table.add_row(i.name, str(i.description.get("backbone", "?")), str(i.description.get("view", "")),
                      str(i.entries), f"{i.bytes / 1e6:.1f}")
    out.print(table)
    out.print(f"total {sum(i.bytes for i in infos) / 1e6:.1f} MB")


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir")) -> None:
    """Delete every cached feature."""
    from ..features.cache import FeatureCache

    freed = FeatureCache(cache_dir).clear()
    out.print(f"freed {freed / 1e6:.1f} MB")


