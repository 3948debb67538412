"""How tensors run on this machine: device, thread count, bf16 support, memory format, batching.

One place decides the fast path (channels_last + bf16 autocast on CPUs with native bf16, AMP on CUDA)
so extraction, prediction and training agree.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Iterator

import torch

__all__ = ["pick_device", "cpu_has_bf16", "autocast", "prepare_model", "to_device_batch",
           "keep_freed_memory", "seed_cpu"]


def seed_cpu(seed: int) -> None:
    """Seed the CPU generator that augmentations draw from, as ``torch.manual_seed`` does for the CPU, at a
    fraction of its cost: ``torch.manual_seed`` also seeds every accelerator's generators and, in torch
    2.14 under Lightning, took up to 1.5 ms a call, most of a small image's training step when called per
    image (the ``default_generator`` call takes about 1 us; both give the same numbers on the CPU)."""
    torch.default_generator.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 would be slower."""
    if os.environ.get("TRANSFERLAB_NO_BF16"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision context: bf16 on capable CPUs, fp16/bf16 AMP on CUDA, a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_device(accelerator: str) -> str:
    """The device an ``--accelerator`` trains on: ``cuda`` for gpu/cuda (and auto where CUDA is available),
    ``cpu`` for cpu (and auto without CUDA), else the accelerator's own name."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("cpu", "auto") else accelerator


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default every activation larger than a few MB is a fresh ``mmap``, and the kernel zeroes its
    pages again on first touch, a large share of a CPU forward pass. With large allocations served from
    the heap and no trimming, the pages are reused (BENCHMARKS.md, "Figures behind the defaults"). This
    is PyTorch's CPU tuning guide's "use a caching allocator" advice done with glibc itself. The price is
    that the process keeps its peak memory until it exits. Does nothing off glibc, or with ``TRANSFERLAB_NO_MALLOPT=1``;
    returns whether it applied.
    """
    if os.environ.get("TRANSFERLAB_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def prepare_model(model: torch.nn.Module, device: torch.device, keep_memory: bool = True) -> torch.nn.Module:
    """Move to ``device`` in channels_last memory format (faster convolutions on CPU and GPU); on a CPU,
    also :func:`keep_freed_memory` unless ``keep_memory`` is False (a service would keep its peak)."""
    if device.type == "cpu" and keep_memory:
        keep_freed_memory()
    return model.to(device=device, memory_format=torch.channels_last)


def to_device_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 NCHW batch on ``device`` in channels_last layout."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode + inference mode for the duration of the block."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


class FrozenGraph:
    """A frozen-weights module compiled on first use into a TorchScript graph with BatchNorm folded
    into the convolutions (``torch.jit.freeze`` + ``optimize_for_inference``): about 1.5x faster than
    eager on a CPU for inference, and batch-size invariant. Falls back to eager mode when tracing
    fails, on CUDA, or with ``TRANSFERLAB_NO_JIT=1``. Call it inside the same autocast context always.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, mixed_precision: bool) -> None:
        self.module, self.device, self.mixed_precision = module.eval(), device, mixed_precision
        self._graph: torch.nn.Module | None = None
        self._tried = device.type != "cpu" or bool(os.environ.get("TRANSFERLAB_NO_JIT"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tried:
            self._tried = True
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(self.module, x[:1], check_trace=False)
                    self._graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            except Exception:  # an architecture TorchScript cannot trace: eager is still correct
                self._graph = None
        return (self._graph or self.module)(x)
