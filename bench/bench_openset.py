"""Open set: does the Mahalanobis distance on pooled features tell "none of these classes" apart better
than the classifier's own top probability?

    python bench/bench_openset.py DATA [--splits "6,7,8,9;1,9;0,5,7;2,4,6"]

DATA is a pre-split dataset (Fashion-MNIST from `transferlab data import fashion-mnist`). For each split
(the class indices, in sorted order, held out as unknown) the probe head and the scores are fitted on the
training images of the known classes, the model's threshold on their validation images (95% accepted),
and every score is judged on the test split: known classes' test images are in distribution, the
held-out classes' are not. Prints AUROC and the false-accept rate at 95% true-accept of the model's
k-NN distance, the Mahalanobis distance and the max-softmax baseline, and what the validation
threshold accepts on test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transferlab.diagnostics import dataset_features
from transferlab.diagnostics.probe import choose_c, compress, fit_predict
from transferlab.training.openset import auroc, false_accept_at, fit_knn_distance, fit_mahalanobis, \
    max_softmax_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--splits", default="6,7,8,9;1,9;0,5,7;2,4,6", help="held-out class indices, ';' between splits")
    args = ap.parse_args()
    df = dataset_features(args.data, quiet=True)
    classes = df.dataset.classes
    (_, xtr, ytr), (_, xva, yva), (_, xte, yte) = (df.split(s) for s in ("train", "val", "test"))
    print("| unknown classes | known test acc | k-NN AUROC | k-NN FA@95 | Mahalanobis AUROC | Mahalanobis FA@95 "
          "| max-softmax AUROC | max-softmax FA@95 | val threshold: known / unknown accepted on test | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for split in args.splits.split(";"):
        unknown = {int(i) for i in split.split(",")}
        known = [i for i in range(len(classes)) if i not in unknown]
        m_tr, m_va, inside = np.isin(ytr, known), np.isin(yva, known), np.isin(yte, known)
        ytr_k, yva_k = np.searchsorted(known, ytr[m_tr]), np.searchsorted(known, yva[m_va])
        t = time.perf_counter()
        ztr, zva, zte = compress(xtr[m_tr], xva[m_va], xte)
        c = choose_c(ztr, ytr_k, zva, yva_k, len(known), standardize=False)
        probs = fit_predict(ztr, ytr_k, zte, len(known), c, standardize=False)
        knn = fit_knn_distance(xtr[m_tr])
        threshold = knn.calibrate(xva[m_va])
        seconds = time.perf_counter() - t
        acc = np.mean(probs[inside].argmax(1) == np.searchsorted(known, yte[inside]))
        scores = (knn.score(xte), fit_mahalanobis(xtr[m_tr], ytr_k).score(xte), max_softmax_score(probs))
        cells = [f"{auroc(sc[inside], sc[~inside]):.3f} | {false_accept_at(sc[inside], sc[~inside]):.3f}"
                 for sc in scores]
        d = scores[0]
        print(f"| {', '.join(classes[i] for i in sorted(unknown))} | {acc:.3f} | " + " | ".join(cells) +
              f" | {np.mean(d[inside] <= threshold):.3f} / {np.mean(d[~inside] <= threshold):.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
