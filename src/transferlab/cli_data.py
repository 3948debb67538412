"""The ``data`` and ``cache`` command groups (argument parsing only; they call the library)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape as esc
from rich.table import Table

from .cli_common import print_json, setup_logging, err, out

__all__ = ["data_app", "cache_app"]

cache_app = typer.Typer(no_args_is_help=True, help="Show or free the feature cache.")
data_app = typer.Typer(no_args_is_help=True, help="Audit, split and import datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import datasets as class folders.")
data_app.add_typer(import_app, name="import")


@data_app.command("check")
def data_check(data: Path = typer.Argument(..., help="Labelled folder or manifest."),
               near: bool = typer.Option(True, "--near/--no-near", help="Near-duplicates from backbone features."),
               threshold: float = typer.Option(0.97, "--threshold", help="Cosine similarity for near-duplicates."),
               backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b"),
               cache_dir: Optional[Path] = typer.Option(None, "--cache-dir"),
               quiet: bool = typer.Option(False, "--quiet", "-q"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Audit a dataset: counts, unreadable and converted files, duplicates, leakage, imbalance."""
    from .tools import check_dataset

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


@data_app.command("split")
def data_split(data: Path = typer.Argument(...), out_path: Path = typer.Option(Path("split.csv"), "--out"),
               val: float = typer.Option(0.15, "--val"), test: float = typer.Option(0.15, "--test"),
               seed: int = typer.Option(0, "--seed")) -> None:
    """Write the stratified, seeded split of a dataset as split.csv (path,label,split)."""
    from .data.scan import scan as scan_data
    from .data.split import split_dataset, write_split_csv

    ds = split_dataset(scan_data(data), val, test, seed)
    write_split_csv(ds.samples, out_path)
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
    from .data.imports import import_cifar

    counts = import_cifar(kind, source, out_dir, allow_download=allow_download)
    out.print(f"wrote {kind} to {esc(str(out_dir))}: {counts}")


def _import_idx(kind: str, source: Path, out_dir: Path, per_class: Optional[int], val_per_class: int,
                seed: int) -> None:
    from .data.imports import import_idx

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
    from .data.imports import import_manifest

    res = import_manifest(manifest, out_dir)
    out.print(f"copied {res['copied']} images into {esc(str(out_dir))}; {res['skipped']} skipped")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Show what the feature cache holds."""
    from .features.cache import FeatureCache

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
    from .features.cache import FeatureCache

    freed = FeatureCache(cache_dir).clear()
    out.print(f"freed {freed / 1e6:.1f} MB")


