"""Engines for frozen forward passes: PyTorch or ONNX Runtime, the faster one on this CPU chosen by measurement.

An engine turns a uint8 NCHW batch into float32 outputs of a frozen network (pooled features, or the
activations of frozen lower stages). PyTorch runs a frozen TorchScript graph in channels_last, under bf16
autocast where the CPU computes bf16 natively; ONNX Runtime runs an fp32 graph exported from the same
weights. The ONNX graph is built once per (network, input size, weights digest) and kept under
``$TRANSFERLAB_HOME/engines``; a graph whose embedded digest does not match the weights is rebuilt, never
used. ``auto`` times a few batches through each engine, once per (network, input size, CPU model, precision,
threads), keeps the result in ``choices.json`` beside the graphs, and says what it picked and why.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ._io import atomic_path, transferlab_home, write_json
from .backbones.weights import state_digest
from .errors import ConfigError, ExportError
from .runtime import FrozenGraph, autocast, cpu_has_bf16, to_device_batch

log = logging.getLogger("transferlab")

__all__ = ["ENGINES", "Engine", "EngineChoice", "TorchEngine", "OrtEngine", "engine_name", "open_engine",
           "onnx_engine", "write_onnx", "set_onnx_metadata", "static_same_padding", "network_key", "weights_digest", "cpu_model", "engines_dir", "AGREEMENT"]

ENGINES = ("auto", "torch", "onnxruntime")
_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "pytorch": "torch"}
#: A freshly built ONNX graph must give the PyTorch fp32 outputs to this relative tolerance (max |a - b| over
#: max |b|); otherwise it is removed and not used.
AGREEMENT = 1e-4
#: The micro-benchmark: images per batch, and timed batches per engine after one warm-up batch.
BENCH_BATCH, BENCH_REPS = 16, 2


def engine_name(name: str | None) -> str:
    """``auto``, ``torch`` or ``onnxruntime`` (``onnx`` is accepted for ``onnxruntime``).

    Raises:
        ConfigError: any other name."""
    key = (name or "auto").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ENGINES:
        raise ConfigError(f"engine {name!r}: expected one of {', '.join(ENGINES)}.")
    return key


class Engine(Protocol):
    """A frozen network's forward pass: uint8 NCHW batch in, float32 outputs out (on the engine's device)."""

    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EngineChoice:
    """Which engine runs a network, why, and the img/s the choice was made on (empty when not measured)."""

    engine: str
    reason: str
    rates: dict[str, float] = field(default_factory=dict)
    cpu: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in metrics.json and the service's health)."""
        return asdict(self)

    def line(self) -> str:
        """One line for a printed plan or log."""
        return f"engine: {'ONNX Runtime' if self.engine == 'onnxruntime' else 'PyTorch'} ({self.reason})"


class TorchEngine:
    """PyTorch: a frozen TorchScript graph in channels_last, bf16 autocast where the CPU has native bf16."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: torch.device, mixed_precision: bool) -> None:
        self.device, self.mixed_precision = device, mixed_precision
        self.graph = FrozenGraph(net, device, mixed_precision)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.mixed_precision):
            return self.graph(to_device_batch(batch, self.device)).float()


class OrtEngine:
    """ONNX Runtime fp32 on the CPU over a graph written by :func:`onnx_engine`."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.digest = meta.get("transferlab_weights_digest", "")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixels": x})[0])


def engines_dir() -> Path:
    """``$TRANSFERLAB_HOME/engines``: the ONNX graphs and the cached engine choices."""
    return transferlab_home() / "engines"


def weights_digest(net: torch.nn.Module) -> str:
    """:func:`~transferlab.backbones.weights.state_digest` of every parameter and buffer of ``net`` (the input
    normalisation's non-persistent ones too): what an ONNX graph is keyed by."""
    return state_digest(dict(itertools.chain(net.named_parameters(), net.named_buffers())))


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (else the platform's), with its family and model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        fam, mod = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M), re.search(r"^model\s*:\s*(\d+)$", text, re.M)
        out = name.group(1).strip() if name else platform.processor() or platform.machine()
        return out + (f" (family {fam.group(1)} model {mod.group(1)})" if fam and mod else "")
    except OSError:
        return platform.processor() or platform.machine()


def network_key(name: str, cut_stage: int | None = None) -> str:
    """What names a frozen network in the engines' cache: its timm name, and its cut when it has one."""
    return f"{name}-cut{cut_stage}" if cut_stage else name


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]


def onnx_engine(net: torch.nn.Module, key: str, size: int, threads: int | None = None) -> OrtEngine:
    """The ONNX Runtime engine of ``net`` (uint8 pixels of ``size`` px in), from the graph cached under
    :func:`engines_dir`, built first when it is missing, damaged or made from other weights.

    Raises:
        ExportError: the network cannot be exported, or the exported graph disagrees with PyTorch."""
    digest = weights_digest(net)
    path = engines_dir() / f"{_slug(key)}-{size}px-{digest}.onnx"
    if path.is_file():
        try:
            engine = OrtEngine(path, threads)
        except Exception as exc:  # noqa: BLE001 - a damaged file is rebuilt
            log.warning("ONNX graph %s cannot be loaded (%s); building it again", path.name, exc)
        else:
            if engine.digest == digest:
                return engine
            log.warning("ONNX graph %s was made from other weights; building it again", path.name)
    _export(net, size, path, digest)
    return OrtEngine(path, threads)


def _export(net: torch.nn.Module, size: int, path: Path, digest: str) -> None:
    """Write ``net`` as an fp32 ONNX graph with a dynamic batch, check it against PyTorch, then move it into place."""
    import onnxruntime as ort

    model = copy.deepcopy(net).float().eval().to(memory_format=torch.contiguous_format)
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(x).float().numpy()
    with atomic_path(path) as tmp:
        try:  # on the copy: the original keeps its size-independent padding
            write_onnx(model, x, tmp, "features", {"transferlab_weights_digest": digest,
                                                   "input": f"uint8 RGB pixels, NCHW, {size}x{size}"})
            got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"pixels": x.numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - an architecture the exporter cannot handle
            raise ExportError(f"cannot export the network to ONNX: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        diff = float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-12))
        if not diff <= AGREEMENT:
            raise ExportError(f"the ONNX graph disagrees with PyTorch: relative difference {diff:.1e} > {AGREEMENT:g}")


def write_onnx(net: nn.Module, example: torch.Tensor, path: Path, output: str, meta: dict[str, str]) -> None:
    """Trace ``net`` (TF "same" padding made static for ``example``'s size, in place) to an ONNX graph at ``path``:
    uint8 ``pixels`` in, ``output`` out, a dynamic batch, and ``meta`` as its metadata."""
    static_same_padding(net, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["pixels"], output_names=[output],
                          dynamic_axes={"pixels": {0: "batch"}, output: {0: "batch"}}, opset_version=17, dynamo=False)
    set_onnx_metadata(path, meta)


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the ONNX file's metadata with ``meta``."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def static_same_padding(net: nn.Module, example: torch.Tensor) -> int:
    """Replace timm's ``Conv2dSame`` (TF "same" padding computed at run time) by a fixed ``ZeroPad2d``
    and a plain convolution sharing the weights, for the input size of ``example``; outputs are
    identical. The ONNX graph then has constant pads instead of Shape/Ceil arithmetic, which the
    quantizer calibrates cleanly. Returns how many layers were replaced."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
             for n, m in net.named_modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.inference_mode():
            net(example[:1])
    finally:
        for h in hooks:
            h.remove()
    for name, (h, w) in sizes.items():
        parent_name, _, attr = name.rpartition(".")
        old = net.get_submodule(name)
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation,
                         old.groups, old.bias is not None)
        conv.weight, conv.bias = old.weight, old.bias
        pads = pad_same_arg([h, w], list(old.kernel_size), list(old.stride), list(old.dilation))
        setattr(net.get_submodule(parent_name) if parent_name else net, attr, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return len(sizes)


def _choices_file() -> Path:
    return engines_dir() / "choices.json"


def _read_choices() -> dict[str, Any]:
    try:
        return json.loads(_choices_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _rate(engine: Engine, size: int) -> float:
    """Images/s of ``engine`` on random pixels: the best of :data:`BENCH_REPS` batches after a warm-up."""
    x = torch.randint(0, 256, (BENCH_BATCH, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    engine(x)
    best = float("inf")
    for _ in range(BENCH_REPS):
        t = time.perf_counter()
        engine(x)
        best = min(best, time.perf_counter() - t)
    return BENCH_BATCH / best


def open_engine(net: torch.nn.Module, key: str, size: int, *, engine: str = "auto", device: torch.device | None = None,
                mixed_precision: bool = True) -> tuple[Engine, EngineChoice]:
    """The engine that runs the frozen ``net`` on ``size`` px inputs, and why it was chosen.

    ``key`` names the network (its timm name and cut); ``engine`` is ``torch``, ``onnxruntime`` or ``auto``:
    PyTorch on an accelerator; on a CPU the faster of the two in a micro-benchmark, measured once per (key,
    size, CPU model, precision, threads) and cached.

    Raises:
        ConfigError: an unknown engine, or ``onnxruntime`` on an accelerator.
        ExportError: ``onnxruntime`` asked for a network that cannot be exported."""
    name = engine_name(engine)
    device = device or torch.device("cpu")
    cpu = cpu_model()
    if name == "torch":
        return TorchEngine(net, device, mixed_precision), EngineChoice("torch", "--engine torch", cpu=cpu)
    if device.type != "cpu":
        if name == "onnxruntime":
            raise ConfigError("--engine onnxruntime runs on the CPU; this run is on "
                              f"{device.type} (use --engine torch or --device cpu).")
        return TorchEngine(net, device, mixed_precision), EngineChoice("torch", f"PyTorch on {device.type}", cpu=cpu)
    if name == "onnxruntime":
        return onnx_engine(net, key, size), EngineChoice("onnxruntime", "--engine onnxruntime", cpu=cpu)
    return _auto(net, key, size, device, mixed_precision, cpu)


def _auto(net: torch.nn.Module, key: str, size: int, device: torch.device, mixed_precision: bool,
          cpu: str) -> tuple[Engine, EngineChoice]:
    """``auto`` on a CPU: the engine measured faster for this slot earlier, else measured now and recorded."""
    precision = "bf16" if mixed_precision and cpu_has_bf16() else "fp32"
    threads = torch.get_num_threads()
    slot = f"{key}|{size}px|{cpu}|torch {precision}|{threads} threads"
    torch_engine = TorchEngine(net, device, mixed_precision)
    known = _read_choices().get(slot) or {}
    rates = {k: float(v) for k, v in (known.get("rates") or {}).items()}
    measured = known.get("engine") in ("torch", "onnxruntime")
    if measured and known["engine"] == "torch":
        return torch_engine, EngineChoice("torch", f"{_why(rates, precision, threads)}; measured earlier", rates, cpu)
    if not measured:
        rates = {"torch": _rate(torch_engine, size)}
    try:
        ort_engine = onnx_engine(net, key, size)
    except ExportError as exc:
        return torch_engine, EngineChoice("torch", f"ONNX Runtime unusable: {exc}", rates, cpu)
    if measured:
        return ort_engine, EngineChoice("onnxruntime", f"{_why(rates, precision, threads)}; measured earlier", rates, cpu)
    rates["onnxruntime"] = _rate(ort_engine, size)
    best = max(rates, key=rates.get)
    choices = _read_choices()
    choices[slot] = {"engine": best, "rates": rates, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        write_json(_choices_file(), choices)
    except OSError as exc:  # a read-only home: measured again next time
        log.warning("cannot record the engine choice in %s (%s)", _choices_file(), exc)
    return (ort_engine if best == "onnxruntime" else torch_engine), EngineChoice(best, _why(rates, precision, threads),
                                                                                  rates, cpu)


def _why(rates: dict[str, float], precision: str, threads: int) -> str:
    """``ONNX Runtime 148 img/s against PyTorch bf16 217 img/s, 2 threads``."""
    ort_rate, torch_rate = rates.get("onnxruntime", 0.0), rates.get("torch", 0.0)
    return (f"ONNX Runtime fp32 {ort_rate:.0f} img/s against PyTorch {precision} {torch_rate:.0f} img/s "
            f"on {threads} thread{'s' if threads != 1 else ''}")
