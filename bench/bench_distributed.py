"""Feature extraction in one process against the same work shared by two ranks, side by side (not a test):

    python bench/bench_distributed.py [--images 2000] [--size 224] [--repeats 3]

The same ``--images`` photographs (crops of scikit-image's sample photos, 256 px PNGs) go through
efficientnet_lite0 at ``--size``, with no feature cache:

1. one process with 2 torch threads and 2 decoding workers;
2. two ranks under torchrun (gloo), each with 1 torch thread and 1 decoding worker, through the same
   ``FeatureExtractor.extract(..., world=...)`` a distributed run uses, the gather included.

Each is timed after its model is loaded and warmed up (one batch), until every feature is gathered;
the order alternates over ``--repeats``, and the median is printed, with each rank's own throughput and
what a run of 1,000,000 images would take on 8 such machines, computed from the measured figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def worker(args: argparse.Namespace) -> None:
    """One process of either configuration; rank 0 prints its timing as JSON."""
    import torch

    from transferlab.backbones import create_backbone
    from transferlab.distributed import barrier, join, launch_layout
    from transferlab.features.extract import FeatureExtractor

    devices, nodes = launch_layout()
    world = join(accelerator="cpu", devices=devices, num_nodes=nodes)
    torch.set_num_threads(args.threads)
    paths = sorted(str(p) for p in Path(args.folder).glob("*.png"))[: args.images]
    backbone, info = create_backbone("efficientnet_lite0", image_size=args.size)
    extractor = FeatureExtractor(backbone, info, workers=args.workers, quiet=True)
    extractor.extract(paths[:32], None)  # trace the graph, warm the allocator
    barrier(world)
    t = time.perf_counter()
    ext = extractor.extract(paths, None, world=world)
    seconds = time.perf_counter() - t
    assert ext.ok.all() and ext.features.shape[0] == len(paths)
    if world.is_zero:
        print(json.dumps({"world": world.size, "seconds": seconds, "per_rank": ext.per_rank,
                          "threads": torch.get_num_threads()}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(folder: Path, args: argparse.Namespace, ranks: int) -> dict:
    common = [__file__, "--worker", "--folder", str(folder), "--images", str(args.images), "--size", str(args.size)]
    if ranks == 1:
        cmd = [sys.executable, *common, "--threads", "2", "--workers", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_free_port()), *common, "--threads", "1", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default=None)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from _images import small_pngs

    folder = Path(args.folder or Path(tempfile.gettempdir()) / "transferlab-bench-distributed")
    small_pngs(folder, args.images, size=256)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(args.repeats):
        for ranks in ((1, 2) if i % 2 == 0 else (2, 1)):
            r = _run(folder, args, ranks)
            runs[ranks].append(r)
            print(f"  repeat {i + 1}: {ranks} process(es): {r['seconds']:.1f}s {args.images / r['seconds']:.1f} img/s",
                  flush=True)
    one = statistics.median(r["seconds"] for r in runs[1])
    two = statistics.median(r["seconds"] for r in runs[2])
    shares = runs[2][0]["per_rank"]
    machine = args.images / two
    print(f"{args.images} images, efficientnet_lite0 at {args.size}px, no cache, median of {args.repeats}:")
    print(f"  1 process x 2 threads : {one:6.1f}s  {args.images / one:6.1f} img/s")
    print(f"  2 ranks x 1 thread    : {two:6.1f}s  {machine:6.1f} img/s  (shares {shares}, "
          f"{machine / 2:.1f} img/s per rank)  ratio {one / two:.2f}x")
    hours = 1_000_000 / (8 * machine) / 3600
    print(f"  computed, not measured: 1,000,000 images on 8 such machines (2 ranks each, 16 ranks) at "
          f"{machine:.1f} img/s per machine: {hours:.2f} h of extraction")


if __name__ == "__main__":
    main()
