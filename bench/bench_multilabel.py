"""Multi-label on real pictures: Fashion-MNIST garments (and scikit-learn digits) composited up to four to
a canvas, labels = the classes present.

    python bench/bench_multilabel.py OUT [--n 2000] [--fashion /usr/share/datasets/fashion-mnist] [--mode head]
        [--balance none|weights]

For each source, builds OUT/<source>/labels.csv (``path,labels``; one class made rare on purpose, and
about one canvas in eight empty, i.e. no label), trains with ``transferlab.train`` and prints, on the test
split: mAP, micro and macro F1 with the thresholds tuned on validation against one 0.5 threshold for every
label, subset accuracy, label cardinality and the rare label's AP; then how far each split's share of every
label lies from its target (70/15/15) with iterative stratification against a random split of the same
images (mean over labels and over 20 seeds of the largest deviation, in images).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.imports import read_idx
from transferlab.data.scan import Sample, scan
from transferlab.data.split import iterative_split
from transferlab.pipeline import train
from transferlab.training.multilabel import label_matrix

FASHION = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot")


def _sources(args) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = {"digits": ((d.images * 255 / 16).astype(np.uint8), d.target, [f"d{i}" for i in range(10)])}
    folder = Path(args.fashion)
    if (folder / "train-images-idx3-ubyte.gz").is_file():
        out["fashion-mnist"] = (read_idx(folder / "train-images-idx3-ubyte.gz"),
                                read_idx(folder / "train-labels-idx1-ubyte.gz"), list(FASHION))
    return out


def build(root: Path, images: np.ndarray, targets: np.ndarray, names: list[str], n: int, seed: int = 0) -> Path:
    """``n`` canvases of 2x2 slots; each slot holds an item with probability 0.4, class 9 only rarely."""
    rng = np.random.default_rng(seed)
    side = images.shape[1]
    common = np.flatnonzero(targets != 9)
    rare = np.flatnonzero(targets == 9)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        canvas = np.zeros((2 * side, 2 * side), np.uint8)
        present = set()
        for slot in range(4):
            if rng.random() < 0.4:
                pool = rare if rng.random() < 0.03 else common
                k = int(rng.choice(pool))
                r, c = divmod(slot, 2)
                canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = images[k]
                present.add(names[targets[k]])
        name = f"c{i:05d}.png"
        Image.fromarray(canvas).convert("RGB").save(root / name)
        rows.append([name, ";".join(sorted(present))])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    return root / "labels.csv"


def _f1s(y: np.ndarray, p: np.ndarray, cut) -> tuple[float, float]:
    pred = p >= cut
    tp = (pred & (y == 1)).sum(0)
    micro = 2 * tp.sum() / max(1, pred.sum() + y.sum())
    per = 2 * tp / np.maximum(pred.sum(0) + y.sum(0), 1)
    return float(micro), float(per[y.sum(0) > 0].mean())


def split_deviation(samples: list[Sample], classes: list[str], seeds: int = 20) -> tuple[float, float]:
    """Mean over seeds of the mean over labels of the largest |count in a split - target|, in images:
    (iterative stratification, random split)."""
    fractions = np.array([0.7, 0.15, 0.15])
    y = label_matrix([s.labels for s in samples], classes)
    target = fractions[:, None] * y.sum(0)[None, :]

    def deviation(where: np.ndarray) -> float:
        counts = np.stack([y[where == k].sum(0) for k in range(3)])
        return float(np.abs(counts - target).max(0).mean())

    ours, rand = [], []
    index = {s.path: i for i, s in enumerate(samples)}
    for seed in range(seeds):
        split = iterative_split(samples, 0.15, 0.15, seed)
        where = np.empty(len(samples), int)
        for s in split:
            where[index[s.path]] = ("train", "val", "test").index(s.split)
        ours.append(deviation(where))
        perm = np.random.default_rng(seed).permutation(len(samples))
        cuts = np.round(np.cumsum(fractions) * len(samples)).astype(int)
        where = np.empty(len(samples), int)
        where[perm[:cuts[0]]], where[perm[cuts[0]:cuts[1]]], where[perm[cuts[1]:]] = 0, 1, 2
        rand.append(deviation(where))
    return float(np.mean(ours)), float(np.mean(rand))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--mode", default="head")
    ap.add_argument("--balance", default="none", help="weights: each label's positives weighted by its rarity")
    args = ap.parse_args()
    print("| data | images (train/val/test) | cardinality | mAP | micro-F1 tuned / 0.5 | macro-F1 tuned / 0.5 "
          "| subset acc | rare label AP (test support) | split deviation iterative / random | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (images, targets, names) in _sources(args).items():
        manifest = build(Path(args.out) / name, images, targets, names, args.n)
        t0 = time.perf_counter()
        res = train(manifest, Path(args.out) / f"run-{name}", overwrite=True, mode=args.mode, quiet=True,
                    balance=args.balance)
        seconds = time.perf_counter() - t0
        m = res.metrics
        test = m["test"]
        with open(res.run_dir / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        classes = test["labels"]
        y = label_matrix([r["true_labels"].split(";") if r["true_labels"] else [] for r in rows], classes)
        p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        cut = np.array([m["thresholds"][c] for c in classes])
        (mi_t, ma_t), (mi_h, ma_h) = _f1s(y, p, cut), _f1s(y, p, 0.5)
        rare = test["per_label"][names[9]]
        ds = scan(manifest)
        ours, rand = split_deviation(ds.samples, ds.classes)
        n = m["n_images"]
        print(f"| {name} composites | {n['train']}/{n['val']}/{n['test']} | {test['label_cardinality']:.2f} | "
              f"{test['mAP']:.4f} | {mi_t:.4f} / {mi_h:.4f} | {ma_t:.4f} / {ma_h:.4f} | {test['subset_accuracy']:.4f} | "
              f"{(rare['ap'] or float('nan')):.3f} ({rare['support']}) | {ours:.2f} / {rand:.2f} | {seconds:.0f} |")
    print(json.dumps({"mode": args.mode, "n": args.n, "balance": args.balance}))


if __name__ == "__main__":
    main()
