"""Fine-tuning step throughput on this CPU: fp32 against bf16 autocast, side by side in one run.

    python bench/bench_train_step.py [--sizes 224,128,64] [--batch 32] [--reps 8]

One training step is what fine-tuning does per batch: forward, cross-entropy, backward and an AdamW
step, on efficientnet_lite0 in channels_last with its stride-4 stages frozen (the default), on
synthetic uint8 batches. Prints images/s for each precision and the ratio. Not part of the tests.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from transferlab.backbones.models import Classifier, build_head, create_backbone
from transferlab.planning import _trainable


def throughput(model: nn.Module, size: int, batch: int, reps: int, bf16: bool) -> float:
    """Images per second of full training steps (best of ``reps`` after one warm-up)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="224,128,64")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    backbone, info = create_backbone("efficientnet_lite0")
    model = Classifier(backbone, build_head(info.num_features, 10), info.preprocessing)
    live = {id(p) for p in _trainable(model, info, 4)}
    for p in model.parameters():
        p.requires_grad_(id(p) in live)
    model = model.to(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for size in (int(s) for s in args.sizes.split(",")):
        fp32 = throughput(model, size, args.batch, args.reps, bf16=False)
        bf16 = throughput(model, size, args.batch, args.reps, bf16=True)
        print(f"{size:4d} px: fp32 {fp32:6.1f} img/s, bf16 autocast {bf16:6.1f} img/s, fp32/bf16 {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
