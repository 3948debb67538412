"""How much a trained model's predictions move under tiny input noise (why int8 can or cannot agree).

    python bench/bench_fragility.py RUN/model [--levels 1,2]

For each noise amplitude A, adds uniform integer noise in [-A, A] grey levels to the model's test
images (resized and cropped as for prediction) and prints the share of fp32 predictions that change,
with test accuracy before and after, and how far the backbone's pooled features move: their cosine
similarity to the clean features, and the mean distance they move against the mean distance between
two different test images. A model whose predictions change under +-1 level cannot agree with an int8
copy of itself on 99% of images. Not part of the tests.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
import torch

from transferlab.artifacts import load_artifact
from transferlab.data.images import load_image
from transferlab.data.transforms import EvalTransform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--levels", default="1,2")
    ap.add_argument("--limit", type=int, default=400)
    args = ap.parse_args()
    clf, cfg = load_artifact(args.model)
    clf = clf.float().eval()
    tf = EvalTransform(clf.preprocessing)
    with open(cfg["training"]["split_csv"], newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"][:args.limit]
    x = torch.stack([tf(load_image(r["path"], draft=tf.draft)) for r in rows])
    y = np.array([cfg["classes"].index(r["label"]) for r in rows])
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        feats = clf.features(x)
        ref = clf.head(feats).argmax(1).numpy()
        between = torch.cdist(feats, feats).sum() / (len(x) * (len(x) - 1))
        print(f"{len(y)} test images; fp32 accuracy {np.mean(ref == y):.3f}; mean feature distance between two "
              f"images {between:.2f}")
        for a in (int(v) for v in args.levels.split(",")):
            noisy = (x.int() + torch.randint(-a, a + 1, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
            moved = clf.features(noisy)
            got = clf.head(moved).argmax(1).numpy()
            cos = torch.nn.functional.cosine_similarity(feats, moved).mean()
            print(f"noise +-{a} grey levels: {np.mean(got != ref):.1%} of predictions change; "
                  f"accuracy {np.mean(got == y):.3f}; features move {(moved - feats).norm(dim=1).mean():.2f} "
                  f"(cosine similarity to clean {cos:.3f})")


if __name__ == "__main__":
    main()
