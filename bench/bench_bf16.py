"""Does bf16 autocast cost accuracy? fp32 against bf16 features on the digits demo data, in one run.

    python bench/bench_bf16.py

Prints the cosine similarity of the two feature sets and the head's test accuracy trained on each.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from transferlab.backbones import create_backbone
from transferlab.data import scan, split_dataset
from transferlab.demo import build_digits_dataset
from transferlab.features import FeatureExtractor
from transferlab.training.head import HeadConfig, fit_head


def main() -> None:
    data = build_digits_dataset(Path(tempfile.gettempdir()) / "transferlab-bench" / "digits")
    ds = split_dataset(scan(data), seed=0)
    paths = [s.path for s in ds.samples]
    y = np.array([ds.classes.index(s.label) for s in ds.samples])
    split = np.array([s.split for s in ds.samples])
    bb, info = create_backbone("efficientnet_lite0")
    feats = {}
    for name, amp in (("fp32", False), ("bf16", True)):
        feats[name] = FeatureExtractor(bb, info, mixed_precision=amp, quiet=True).extract(paths).features
    a, b = feats["fp32"], feats["bf16"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"{len(paths)} images: cosine similarity fp32 vs bf16 features: mean {cos.mean():.5f}, min {cos.min():.5f}")
    for name, f in feats.items():
        res = fit_head(f[split == "train"], y[split == "train"], f[split == "val"], y[split == "val"], 10,
                       HeadConfig(quiet=True))
        import torch

        with torch.no_grad():
            pred = res.head(torch.from_numpy(f[split == "test"])).argmax(1).numpy()
        print(f"head test accuracy on {name} features: {100 * (pred == y[split == 'test']).mean():.2f}%")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFERLAB_HOME", os.path.join(tempfile.gettempdir(), "transferlab-bench", "home"))
    main()
