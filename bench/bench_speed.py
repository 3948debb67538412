"""Side-by-side throughput: the naive pipeline against transferlab's, and transferlab's two engines (PyTorch,
ONNX Runtime) model-only and end to end, on the same images, in one run.

    python bench/bench_speed.py [--large 96] [--small 512] [--backbone efficientnet_lite0]
    TRANSFERLAB_NO_BF16=1 python bench/bench_speed.py     # the path of a CPU without native bf16

Prints images/s for each path and the ratios the speed targets are stated in, which engine ``auto`` picks,
and predict's single-image latency with ``auto`` against PyTorch. Each path is timed in a fresh process,
so that none inherits another's process-wide state (allocator settings, thread pools, TorchScript caches).
Not part of the tests.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import transferlab  # noqa: F401  first, so that its OpenMP setting applies to every path timed here
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _images import large_jpegs, small_pngs  # noqa: E402

from transferlab.backbones import Normalize, create_backbone  # noqa: E402
from transferlab.features import FeatureExtractor  # noqa: E402
from transferlab.engines import cpu_model  # noqa: E402
from transferlab.runtime import cpu_has_bf16, keep_freed_memory  # noqa: E402
from transferlab.training.finetune import FinetuneConfig, backbone_stages, early_stages  # noqa: E402


def _init_process() -> None:
    """As in a process started from the shell: every core's thread, and (on Linux) decoding workers forked
    rather than spawned, which a spawned process would otherwise make its default."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if sys.platform.startswith("linux"):
        multiprocessing.set_start_method("fork", force=True)


def isolated(fn, *args):
    """``fn(*args)`` run in a fresh process with every core's thread."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process) as ex:
        return ex.submit(fn, *args).result()


def best_of(n: int, fn, *args) -> float:
    """The highest of ``n`` fresh-process runs of ``fn(*args)`` (a busy machine only ever slows a run)."""
    return max(isolated(fn, *args) for _ in range(n))


def naive_extract(paths, name: str, batch_size=64) -> float:
    """PIL decode + timm transform + fp32 NCHW forward, one process (what the seed projects do)."""
    import timm.data
    from PIL import Image

    backbone, info = create_backbone(name)
    pre = info.preprocessing
    tf = timm.data.create_transform(input_size=(3, pre.size, pre.size), crop_pct=pre.crop_pct,
                                    interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    model = backbone.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            model(x)
    return len(paths) / (time.perf_counter() - t)


def ours_extract(paths, name: str, engine: str = "torch") -> float:
    """transferlab's FeatureExtractor on ``engine``, no feature cache, cold but for the engine's opening (the
    ONNX graph is built once per machine; PyTorch's first batch still freezes its TorchScript graph)."""
    ex = FeatureExtractor(*create_backbone(name), quiet=True, engine=engine)
    ex.engine
    t = time.perf_counter()
    ex.extract(paths, cache=None)
    return len(paths) / (time.perf_counter() - t)


def model_only(name: str, engine: str, batch_size: int = 32, reps: int = 4) -> float:
    """The engine alone on ready random pixels at the extractor's batch size: the best of ``reps`` batches."""
    ex = FeatureExtractor(*create_backbone(name), quiet=True, engine=engine)
    s = ex.info.preprocessing.size
    x = torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8)
    ex.forward(x)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        ex.forward(x)
        best = min(best, time.perf_counter() - t)
    return batch_size / best


def decode_only(paths, name: str) -> float:
    """Decoding and resizing alone, in the extractor's DataLoader workers (one per core), no forward pass."""
    from torch.utils.data import DataLoader

    from transferlab.data.loader import ImageFiles, collate_images, worker_init
    from transferlab.data.transforms import EvalTransform
    from transferlab.features.extract import default_workers

    files = ImageFiles(paths, EvalTransform(create_backbone(name)[1].preprocessing))
    loader = DataLoader(files, batch_size=32, num_workers=default_workers(), collate_fn=collate_images,
                        prefetch_factor=4, worker_init_fn=worker_init)
    t = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - t)


def auto_pick(name: str) -> tuple[str, str]:
    """What ``--engine auto`` picks here, measured afresh (a private choices file), and why."""
    os.environ["TRANSFERLAB_HOME"] = tempfile.mkdtemp(prefix="tl-auto-")
    ex = FeatureExtractor(*create_backbone(name), quiet=True)
    return ex.engine.name, ex.choice.reason


def ceiling(name: str, batch_sizes=(16, 32, 64), reps=3) -> float:
    """Forward only, random pixels, in the fastest form this CPU runs: channels_last, bf16 autocast
    where supported, frozen TorchScript graph with BatchNorm folded; the best of ``batch_sizes``."""
    from transferlab.runtime import FrozenGraph

    keep_freed_memory()
    backbone, info = create_backbone(name)
    net = torch.nn.Sequential(Normalize(info.preprocessing.mean, info.preprocessing.std), backbone).eval()
    net = FrozenGraph(net.to(memory_format=torch.channels_last), torch.device("cpu"), True)
    s = info.preprocessing.size
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_bf16() else torch.autocast("cpu", enabled=False)
    best = 0.0
    for batch_size in batch_sizes:
        x = torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), ctx:
            net(x)
            t = time.perf_counter()
            for _ in range(reps):
                net(x)
        best = max(best, reps * batch_size / (time.perf_counter() - t))
    return best


def train_step_rate(name: str, fast: bool, batch_size=32, steps=8) -> float:
    """Images/s of a full fine-tuning step (forward, backward, AdamW) on random pixels, from the median
    of ``steps`` timed steps after two warm-up steps."""
    bb, info = create_backbone(name)
    head = torch.nn.Linear(info.num_features, 10)
    model = torch.nn.Sequential(Normalize(info.preprocessing.mean, info.preprocessing.std), bb, head).train()
    if fast:  # transferlab's fine-tuning keeps pretrained BatchNorm statistics frozen (eval mode) and the
        # stages at output stride 4 or finer frozen (FinetuneConfig.frozen_stride)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        stages = backbone_stages(bb)
        for stage in stages[:early_stages(bb, stages, info.preprocessing.size, FinetuneConfig.frozen_stride)]:
            for p in stage:
                p.requires_grad_(False)
    s = info.preprocessing.size
    x = torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch_size,))
    if fast:
        keep_freed_memory()
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fast and cpu_has_bf16() else (
        lambda: torch.autocast("cpu", enabled=False))

    def step():
        with ctx():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch_size / statistics.median(times)


def _latency(pred, paths, reps: int) -> tuple[float, float]:
    for p in paths[:5]:
        pred.predict([p])
    times = []
    for i in range(reps):
        t = time.perf_counter()
        pred.predict([paths[i % len(paths)]])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), float(np.percentile(times, 95))


def predict_figures(paths, backbone_name: str, reps: int = 50, batch: int = 256) -> dict[str, tuple]:
    """Warm single-image latency (median, p95 ms) and batch images/s through the Predictor that
    `transferlab predict` uses, for each engine: PyTorch (bf16 where native), PyTorch fp32, ONNX Runtime."""
    from transferlab.artifacts import save_artifact
    from transferlab.backbones import Classifier, build_head
    from transferlab.export import export_model
    from transferlab.predict import load_model

    bb, info = create_backbone(backbone_name)
    model = Classifier(bb, build_head(info.num_features, 10), info.preprocessing)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        save_artifact(Path(d) / "m", model, {"classes": [str(i) for i in range(10)], "backbone": info.to_dict(),
                                             "preprocessing": info.preprocessing.to_dict(),
                                             "head": {"in_features": info.num_features, "hidden": [], "dropout": 0}})
        export_model(Path(d) / "m", "onnx", Path(d) / "m.onnx")
        engines = {"PyTorch" + (" bf16" if cpu_has_bf16() else " fp32"): dict(engine="torch"),
                   "PyTorch fp32": dict(engine="torch", mixed_precision=False),
                   "ONNX Runtime fp32 (backbone)": dict(engine="onnxruntime"),
                   "auto": dict(engine="auto"),
                   "ONNX Runtime fp32 (exported file)": dict(path="m.onnx")}
        for label, kw in engines.items():
            pred = load_model(Path(d) / kw.pop("path", "m"), **kw)
            if label == "auto":
                label = f"auto ({pred.engine})"
            med, p95 = _latency(pred, paths, reps)
            t = time.perf_counter()
            pred.predict(paths[:batch])
            out[label] = (med, p95, batch / (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", type=int, default=160)
    ap.add_argument("--small", type=int, default=1024)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "transferlab-bench"))
    args = ap.parse_args()
    root = Path(args.dir)
    large = large_jpegs(root / "large", args.large)
    small = small_pngs(root / "small", args.small)
    os.environ["TRANSFERLAB_HOME"] = tempfile.mkdtemp(prefix="tl-bench-")  # a fresh engine choice and ONNX graph
    _init_process()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"native bf16: {cpu_has_bf16()}; backbone {args.backbone} at {create_backbone(args.backbone)[1].preprocessing.size}px")
    rows = []
    ceil = isolated(ceiling, args.backbone)
    for label, paths in (("large JPEG 3000x2000", large), ("small PNG 128x128", small)):
        rows.append((label, best_of(2, naive_extract, paths, args.backbone), best_of(2, ours_extract, paths, args.backbone)))
    print(f"\n{'extraction, best of 2':<24}{'naive img/s':>12}{'torch img/s':>12}{'ratio':>8}")
    for label, naive, ours in rows:
        print(f"{label:<24}{naive:>12.1f}{ours:>12.1f}{ours / naive:>7.2f}x")
    print(f"model-only ceiling ({'bf16' if cpu_has_bf16() else 'fp32'} channels_last, random pixels, best batch size): "
          f"{ceil:.1f} img/s; "
          f"small PNG extraction at {100 * rows[1][2] / ceil:.0f}% of it")
    decode = {label: best_of(2, decode_only, paths, args.backbone) for label, paths in (("large", large), ("small", small))}
    print(f"\ndecoding alone (workers, no forward): large JPEG {decode['large']:.1f} img/s, small PNG {decode['small']:.1f} img/s")
    print("bound: the cores shared by decoding and the forward pass, 1 / (1/decode + 1/model-only)")
    print(f"\n{'engine, best of 2':<14}{'model-only':>11}{'large JPEG':>11}{'% model':>8}{'% bound':>8}"
          f"{'small PNG':>11}{'% model':>8}{'% bound':>8}")
    e2e = {}
    for engine in ("torch", "onnxruntime"):
        mo = best_of(2, model_only, args.backbone, engine)
        lj, sp = (best_of(2, ours_extract, paths, args.backbone, engine) for paths in (large, small))
        e2e[engine] = (lj, sp)
        bl, bs = (1 / (1 / decode[k] + 1 / mo) for k in ("large", "small"))
        print(f"{engine:<14}{mo:>11.1f}{lj:>11.1f}{100 * lj / mo:>7.0f}%{100 * lj / bl:>7.0f}%"
              f"{sp:>11.1f}{100 * sp / mo:>7.0f}%{100 * sp / bs:>7.0f}%")
    pick, why = isolated(auto_pick, args.backbone)
    print(f"auto picks {pick}: {why}")
    print(f"end to end, auto's engine against the PyTorch path: large JPEG {e2e[pick][0] / e2e['torch'][0]:.2f}x, "
          f"small PNG {e2e[pick][1] / e2e['torch'][1]:.2f}x")
    naive_t, ours_t = isolated(train_step_rate, args.backbone, False), isolated(train_step_rate, args.backbone, True)
    print(f"\nfine-tuning step (batch 32, median of 8): naive fp32 NCHW {naive_t:.1f} img/s, ours {ours_t:.1f} img/s, "
          f"ratio {ours_t / naive_t:.2f}x")
    print(f"\n{'predict (' + args.backbone + ')':<30}{'median ms':>10}{'p95 ms':>8}{'batch img/s':>13}")
    for label, (med, p95, rate) in isolated(predict_figures, small, args.backbone).items():
        print(f"{label:<30}{med:>10.1f}{p95:>8.1f}{rate:>13.1f}")


if __name__ == "__main__":
    main()
