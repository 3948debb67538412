"""Peak memory of streaming feature extraction over many generated images.

    python bench/bench_memory.py [--n 20000]

Extracts features for N small PNGs (no cache) and prints the peak resident memory of the process and
of its decoding workers. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _images import small_pngs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=96, help="side of the generated PNGs")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "transferlab-bench"))
    args = ap.parse_args()
    paths = small_pngs(Path(args.dir) / f"many{args.size}", args.n, size=args.size)
    from transferlab.backbones import create_backbone
    from transferlab.features import FeatureExtractor

    bb, info = create_backbone(args.backbone)
    ex = FeatureExtractor(bb, info, quiet=False)
    t = time.perf_counter()
    res = ex.extract(paths, cache=None)
    dt = time.perf_counter() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{args.n} images ({args.size}px PNG) -> features {res.features.shape} in {dt:.0f}s "
          f"({args.n / dt:.1f} img/s)")
    print(f"peak RSS: main process {own:.0f} MB, largest decoding worker {kids:.0f} MB "
          f"(features matrix itself: {res.features.nbytes / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
