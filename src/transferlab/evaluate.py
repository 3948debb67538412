"""``transferlab evaluate``: a saved model on any labelled folder, with the full report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .data.scan import Skipped, scan
from .data.split import write_skipped_csv
from .errors import DataError
from .evaluation.outputs import SplitResult, write_run_outputs
from .evaluation.sections import report_sections
from .features.extract import default_workers
from .predict import load_model

__all__ = ["evaluate"]


def evaluate(model: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
             *, split: str | None = None, workers: int | None = None, engine: str = "auto") -> dict[str, Any]:
    """Evaluate a saved model on a labelled folder (every image, or only ``split`` of a pre-split one)
    and write metrics.json, plots, predictions.csv and report.html into ``out``. ``engine`` runs the
    backbone for the probabilities; the report's Grad-CAM uses the PyTorch network."""
    predictor = load_model(model, engine=engine)
    ds = scan(data, task="multilabel" if predictor.multilabel else "single")
    samples = [s for s in ds.samples if split is None or s.split == split]
    predictor.workers = default_workers() if workers is None else workers
    if predictor.multilabel:
        from .multilabel import evaluate_multilabel

        return evaluate_multilabel(predictor, ds, samples, model, data, Path(out))
    unknown = sorted({s.label for s in samples} - set(predictor.classes))
    if unknown:
        raise DataError(f"class(es) {', '.join(map(repr, unknown))} in '{data}' are not classes of this model "
                        f"({', '.join(predictor.classes)}).")
    t0 = time.perf_counter()
    probs, errors = predictor.predict_proba([s.path for s in samples])
    skipped = list(ds.skipped) + [Skipped(s.path, e) for s, e in zip(samples, errors) if e]
    ok = [i for i, e in enumerate(errors) if e is None]
    index = {c: i for i, c in enumerate(predictor.classes)}
    res = SplitResult([index[samples[i].label] for i in ok], probs[ok], [samples[i].path for i in ok])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_skipped_csv(skipped, out / "skipped.csv")
    counts: dict[str, dict[str, int]] = {c: {} for c in predictor.classes}
    for i in ok:
        s = samples[i]
        counts[s.label][s.split or "all"] = counts[s.label].get(s.split or "all", 0) + 1
    cfg = predictor.config
    summary = {"model": str(Path(model).resolve()), "data": str(Path(data).resolve()),
               "backbone": cfg["backbone"].get("name"), "images evaluated": len(ok),
               "evaluate (s)": f"{time.perf_counter() - t0:.1f}"}
    sections, extra = report_sections(predictor.model, predictor.classes, res, None)
    return write_run_outputs(out, labels=predictor.classes, test=res, val=None, history=[], summary=summary,
                             counts=counts, skipped=[(k.path, k.reason) for k in skipped], extra_sections=sections,
                             extra_metrics={"backbone": cfg["backbone"].get("name"),
                                            "n_images": {"test": len(ok)}, **extra,
                                            "timing": {"total_s": round(time.perf_counter() - t0, 4)}},
                             title=f"transferlab evaluation: {Path(data).name}")
