"""``transferlab compare``: several backbones trained on one split, in one leaderboard."""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._io import write_text
from .config import TrainConfig
from .data.scan import scan
from .data.split import split_dataset, write_split_csv
from .errors import TransferlabError
from .evaluation.plots import scatter_png
from .evaluation.report import data_uri
from .evaluation.diff import read_predictions
from .evaluation.stats import mcnemar

__all__ = ["compare", "COMPARE_FIELDS"]

log = logging.getLogger("transferlab")

COMPARE_FIELDS = ("backbone", "status", "accuracy", "accuracy_ci", "p_vs_best", "macro_f1", "mAP", "train_s", "latency_ms",
                  "params_m", "artifact_mb", "mode", "reason")


def _latency_ms(model_dir: Path, image: str, repeats: int = 10) -> float:
    from .predict import load_model

    predictor = load_model(model_dir)
    predictor.predict_proba([image])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.predict_proba([image])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def compare(data: str | os.PathLike[str], backbones: Sequence[str], out: str | os.PathLike[str], *,
            mode: str = TrainConfig.mode, time_limit: float | None = None, seed: int = TrainConfig.seed, quiet: bool = False,
            **train_options: Any) -> list[dict[str, Any]]:
    """Train each backbone on the same split (features cached once per backbone), write ``compare.csv``
    and ``compare.html`` (leaderboard and accuracy-versus-latency plot); returns the rows.

    A backbone that cannot run here (no offline weights, a bad name) is reported as skipped with the
    reason instead of stopping the comparison. ``time_limit`` is the budget of each backbone.
    """
    from .pipeline import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = split_dataset(scan(data, task=train_options.get("task", "auto")), seed=seed)
    manifest = out / "split.csv"
    write_split_csv(ds.samples, manifest, ds.task)
    sample_image = next(s.path for s in ds.samples if s.split == "test") if any(
        s.split == "test" for s in ds.samples) else ds.samples[0].path
    rows: list[dict[str, Any]] = []
    for name in backbones:
        row: dict[str, Any] = {"backbone": name, "mode": mode}
        try:
            pretrained = name != "simple_cnn"
            row["mode"] = mode if pretrained else "finetune (from scratch)"
            res = train(manifest, out / name, overwrite=True, backbone=name, mode=mode if pretrained else "finetune", time_limit=time_limit,
                        seed=seed, quiet=quiet, pretrained=pretrained, **train_options)
            test = res.metrics.get("test") or {}
            params = sum(int(np.prod(s)) for s in _shapes(res.model_dir))
            ci = test.get("accuracy_ci")
            row.update(status="ok", accuracy=test.get("accuracy"), macro_f1=test.get("macro_f1"), mAP=test.get("mAP"),
                       accuracy_ci=f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                       train_s=round(res.metrics["timing"]["total_s"], 2),
                       latency_ms=round(_latency_ms(res.model_dir, sample_image), 2), params_m=round(params / 1e6, 3),
                       artifact_mb=round(sum(f.stat().st_size for f in res.model_dir.iterdir()) / 1e6, 2),
                       reason="")
        except TransferlabError as exc:
            log.warning("skipping %s: %s", name, exc)
            row.update(status="skipped", reason=str(exc).split(". Options:")[0])
        rows.append(row)
    _paired_tests(out, rows)
    _write(out, rows, data)
    return rows


def _correct_by_path(run: Path) -> dict[str, bool]:
    """Whether each test image was predicted right, from a run's ``predictions.csv``."""
    return {path: r["pred"] == r["true"] for path, r in read_predictions(run).items()}


def _paired_tests(out: Path, rows: list[dict[str, Any]]) -> None:
    """``p_vs_best``: McNemar's exact test of each model against the most accurate one on the same test
    images (``None`` for the best itself)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("accuracy") is not None
          and (out / r["backbone"] / "predictions.csv").is_file()]
    if not ok:
        return
    best = max(ok, key=lambda r: r["accuracy"])
    ref = _correct_by_path(out / best["backbone"])
    for r in ok:
        if r is best:
            r["p_vs_best"] = None
            continue
        mine = _correct_by_path(out / r["backbone"])
        common = sorted(set(ref) & set(mine))
        r["p_vs_best"] = round(mcnemar([ref[p] for p in common], [mine[p] for p in common])["p_value"], 6)


def _score(row: dict[str, Any]) -> float:
    """What ranks a model: test accuracy, or mAP for a multi-label model (which has no accuracy)."""
    return row.get("accuracy") if row.get("accuracy") is not None else (row.get("mAP") or 0.0)


def _shapes(model_dir: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return [tuple(f.get_slice(k).get_shape()) for k in f.keys()]


def _write(out: Path, rows: list[dict[str, Any]], data: Any) -> None:
    import html

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COMPARE_FIELDS), lineterminator="\n")
    w.writeheader()
    ok = sorted([r for r in rows if r["status"] == "ok"], key=lambda r: -_score(r))
    for r in ok + [r for r in rows if r["status"] != "ok"]:
        w.writerow({k: r.get(k, "") for k in COMPARE_FIELDS})
    write_text(out / "compare.csv", buf.getvalue())
    head = "".join(f"<th>{html.escape(k)}</th>" for k in COMPARE_FIELDS)
    body = ""
    for r in ok + [r for r in rows if r["status"] != "ok"]:
        cells = []
        for k in COMPARE_FIELDS:
            v = r.get(k)
            v = ("best" if k == "p_vs_best" and r.get("status") == "ok" else "") if v is None else v
            cells.append(f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) and k in ('accuracy', 'macro_f1', 'mAP') else str(v))}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    plot = ""
    if ok:
        metric = "test accuracy" if any(r.get("accuracy") is not None for r in ok) else "test mAP"
        png = scatter_png([(r["backbone"], r["latency_ms"], _score(r)) for r in ok],
                          "CPU latency per image (ms, median)", metric, f"{metric.split()[-1]} vs latency")
        plot = f"<img alt='accuracy versus latency' src='{data_uri(png)}'>"
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>transferlab compare</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#1d2330}table{border-collapse:collapse}"
            "th,td{border:1px solid #dde1e7;padding:4px 10px}th{background:#eef1f5}</style></head><body>"
            f"<h1>Backbone leaderboard</h1><p>data: {html.escape(str(data))}; same split for every backbone "
            "(split.csv). accuracy_ci: 95% Wilson interval; p_vs_best: McNemar's exact test against the most "
            "accurate model on the same test images (above 0.05, the difference may be chance).</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{plot}</body></html>")
    write_text(out / "compare.html", page)
