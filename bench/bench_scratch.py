"""What makes the scratch CNN candidate fast on a CPU, measured side by side in one run (not a test):

    python bench/bench_scratch.py [--size 28] [--batch 128]

1. seeding an augmentation: ``torch.manual_seed`` against ``runtime.seed_cpu`` (per call, same numbers);
2. a training step of ``simple_cnn`` (4 stages, channels_last) in fp32 and in bf16 autocast.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from transferlab.backbones.models import SimpleCNN
from transferlab.runtime import cpu_has_bf16, seed_cpu


def per_call(fn, n: int = 2000) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n


def step_rate(size: int, batch: int, bf16: bool, steps: int = 10) -> float:
    model = nn.Sequential(SimpleCNN(), nn.Linear(256, 10)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(), step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    a, b = per_call(torch.manual_seed), per_call(seed_cpu)
    seed_cpu(5)
    r1 = torch.rand(4)
    torch.manual_seed(5)
    same = torch.equal(r1, torch.rand(4))
    print(f"torch.manual_seed {a * 1e6:.1f} us/call, seed_cpu {b * 1e6:.2f} us/call: {a / b:.0f}x; same numbers: {same}")
    fp32 = step_rate(args.size, args.batch, False)
    line = f"simple_cnn training step at {args.size} px, batch {args.batch}: fp32 {fp32:.0f} img/s"
    if cpu_has_bf16():
        bf16 = step_rate(args.size, args.batch, True)
        line += f", bf16 {bf16:.0f} img/s ({bf16 / fp32:.2f}x)"
    else:
        line += " (this CPU has no native bf16: the candidate trains in fp32)"
    print(line)


if __name__ == "__main__":
    main()
