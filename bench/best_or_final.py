"""Would a run have scored better with its final weights than with its best validated ones?

    python bench/best_or_final.py RUN [RUN ...]

For each finished run directory, evaluates on its own test split (``split.csv``) both the kept model
(``RUN/model``: the weights at the best validation loss) and the weights at the end of its schedule (the
averaged weights in ``RUN/checkpoints/last.ckpt``, as Lightning's ``WeightAveraging`` saves them), with
the same preprocessing and predictor, and prints one table row per run. A run whose fine-tuning was not
kept (the head was) is skipped: its final weights were never in question.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from transferlab.artifacts import build_classifier, open_artifact
from transferlab.predict import Predictor


def accuracy(predictor: Predictor, paths: list[str], labels: list[str]) -> float:
    """Top-1 accuracy of ``predictor`` on ``paths``."""
    probs, _ = predictor.predict_proba(paths)
    guess = [predictor.classes[i] for i in np.argmax(probs, axis=1)]
    return float(np.mean([g == y for g, y in zip(guess, labels)]))


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The classifier's weights at the end of the schedule (the module's ``model.`` prefix removed)."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def compare(run: Path) -> dict | None:
    metrics = json.loads((run / "metrics.json").read_text())
    ft = metrics.get("finetune") or {}
    if not ft.get("kept"):
        return None
    with open(run / "split.csv", newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    paths, labels = [r["path"] for r in test], [r["label"] for r in test]
    artifact = open_artifact(run / "model")
    best = Predictor(build_classifier(artifact), artifact.config)
    final_model = build_classifier(artifact)
    final_model.load_state_dict(final_state(run))
    final = Predictor(final_model, artifact.config)
    surv = (metrics.get("strategy") or {}).get("survivor") or {}
    vals = surv.get("validations") or ft.get("validations") or []
    best_at = max((v["epoch"] for v in vals if v.get("best")), default=None)
    return {"run": str(run), "test_best": accuracy(best, paths, labels), "test_final": accuracy(final, paths, labels),
            "reported": (metrics.get("test") or {}).get("accuracy"), "best_epoch": best_at,
            "epochs": ft.get("epochs_run"), "n_test": len(paths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| run | epochs | best at | test (best, kept) | test (final) | final - best |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        row = compare(run)
        if row is None:
            print(f"| {run} | | | head kept | | |")
            continue
        print(f"| {run} | {row['epochs']} | {row['best_epoch']} | {row['test_best']:.4f} | {row['test_final']:.4f} | "
              f"{100 * (row['test_final'] - row['test_best']):+.2f} pts ({row['n_test']} images) |", flush=True)


if __name__ == "__main__":
    main()
