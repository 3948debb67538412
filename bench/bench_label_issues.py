"""Label issues and learning curves on real data: how many flipped labels `data issues` finds, and how
long the learning curve takes from cached features.

    python bench/bench_label_issues.py DATA [DATA ...] [--share 0.05] [--seeds 3]

Each DATA is a class-folder (or pre-split) dataset, e.g. the digits (`transferlab demo` writes them) or
Fashion-MNIST at 100 per class (`transferlab data import fashion-mnist /usr/share/datasets/fashion-mnist
--out fm100 --per-class 100 --val-per-class 20`). A share of the labels of every image is flipped at
random in memory (the files are not touched), the search runs on every image as `data issues` does, and
the script prints recall and precision of the flipped labels in the top 10% of the ranking (a random
ranking has recall 0.10) and among the confident-learning flags, then the learning curve's time and
its first sentence.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from transferlab.diagnostics import dataset_features, find_label_issues, learning_curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| data | images | flipped | top-10% recall | top-10% precision | CL flags | CL precision | CL recall "
          "| search s | curve s | features s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for data in args.data:
        df = dataset_features(data, seed=args.seed, quiet=True)
        rng = np.random.default_rng(args.seed)
        samples, classes = list(df.samples), df.dataset.classes
        flip = rng.choice(len(samples), int(round(args.share * len(samples))), replace=False)
        for i in flip:
            others = [c for c in classes if c != samples[i].label]
            samples[i] = replace(samples[i], label=others[rng.integers(len(others))])
        issues = find_label_issues(samples, df.features, classes, seed=args.seed)
        top = set(issues.ranking()[: int(np.ceil(0.1 * len(samples)))].tolist())
        flipped, flags = set(flip.tolist()), set(np.flatnonzero(issues.suspect).tolist())
        _, xtr, ytr = df.split("train")
        _, xev, yev = df.split("val") if any(s.split == "val" for s in df.samples) else df.split("test")
        t = time.perf_counter()
        curve = learning_curve(xtr, ytr, xev, yev, classes, seeds=args.seeds, seed=args.seed)
        curve_s = time.perf_counter() - t
        print(f"| {data} | {len(samples)} | {len(flipped)} | {len(top & flipped) / len(flipped):.3f} "
              f"| {len(top & flipped) / len(top):.3f} | {len(flags)} | {len(flags & flipped) / max(1, len(flags)):.3f} "
              f"| {len(flags & flipped) / len(flipped):.3f} | {issues.seconds:.1f} | {curve_s:.1f} | {df.seconds:.1f} |")
        print(f"  curve ({len(ytr)} training images): {curve.sentences()[0]}")


if __name__ == "__main__":
    main()
