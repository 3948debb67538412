"""Throughput of a model's exported ONNX files in ONNX Runtime on this CPU, side by side.

    transferlab export MODEL && transferlab export MODEL --int8   # the int8 one may fail its check
    python bench/bench_onnx.py MODEL [--batch 32] [--reps 5]

Times every ``model*.onnx`` in the model directory on the same batch of generated uint8 pixels and
prints images/s, with the precision that ``<file>.check.json`` recorded. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for path in sorted(args.model.glob("model*.onnx")):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _, c, h, w = sess.get_inputs()[0].shape
        x = np.random.default_rng(0).integers(0, 256, (args.batch, c, h, w), dtype=np.uint8)
        sess.run(None, {"pixels": x})
        t = time.perf_counter()
        for _ in range(args.reps):
            sess.run(None, {"pixels": x})
        rate = args.reps * args.batch / (time.perf_counter() - t)
        check = Path(str(path) + ".check.json")
        info = json.loads(check.read_text()) if check.is_file() else {}
        what = info.get("precision", "fp32" if not info.get("int8") else "int8")
        print(f"{path.name:<20}{rate:>8.1f} img/s  check passed: {info.get('passed')}  ({what})")


if __name__ == "__main__":
    main()
