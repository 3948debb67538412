"""Where the fine-tuning loop's time goes on this CPU, and what a fixed time buys at other settings.

    python bench/bench_finetune_loop.py loop FMFULL [--n 4096]
    python bench/bench_finetune_loop.py budget FMFULL --size 64 --batch 32 --epochs 0.45 --seconds 300

FMFULL is the full Fashion-MNIST as class folders (`transferlab data import fashion-mnist
/usr/share/datasets/fashion-mnist --out FMFULL`). ``loop`` runs the real fine-tuning loop
(``fit_finetune``: Lightning, the data module, EMA, callbacks) on ``--n`` training images at 64 px for one
epoch in several settings, one after the other in this process, and prints training images per second for
each. ``budget`` fine-tunes efficientnet_lite0 from a new head on the whole training split at ``--size``
and ``--batch`` for ``--epochs`` (the one-cycle schedule's length), stopped by ``--seconds`` if it runs
over, and prints the accuracy on 2,000 validation images it did not select on. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.backbones.models import Classifier, build_head, create_backbone
from transferlab.data.images import decode
from transferlab.data.transforms import EvalTransform
from transferlab.training.callbacks import History
from transferlab.training.finetune import FinetuneConfig, fit_finetune


def _split(root: Path, name: str) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(os.listdir(root / "train"))
    paths = sorted(str(p) for p in (root / name).glob("*/*.png"))
    return paths, [classes.index(Path(p).parent.name) for p in paths], classes


def _model(size: int, n_classes: int) -> Classifier:
    bb, info = create_backbone("efficientnet_lite0", image_size=size)
    return Classifier(bb, build_head(info.num_features, n_classes), info.preprocessing)


def loop(root: Path, n: int) -> None:
    paths, y, classes = _split(root, "train")
    pick = np.random.default_rng(0).permutation(len(paths))[:n]
    tp, ty = [paths[i] for i in pick], [y[i] for i in pick]
    vp, vy, _ = _split(root, "val")
    settings = [("batch 32, 2 workers, EMA (the default)", 32, 2, True, 0),
                ("batch 32, 2 workers, no EMA", 32, 2, False, 0),
                ("batch 128, 2 workers, EMA", 128, 2, True, 0),
                ("batch 32, no workers, EMA", 32, 0, True, 0),
                ("batch 32, 2 workers, EMA, 1,000 val images twice", 32, 2, True, 1000)]
    print(f"{n} training images at 64 px, one epoch, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, batch, workers, ema, nval in settings:
        cfg = FinetuneConfig(epochs=1, freeze_epochs=0, batch_size=batch, workers=workers, quiet=True, ema=ema,
                             val_every=0.5)
        d = tempfile.mkdtemp()
        t = time.perf_counter()
        fit_finetune(_model(64, len(classes)), tp, ty, vp[:nval], vy[:nval], cfg, d, History(None, "finetune"))
        print(f"| {label} | {n / (time.perf_counter() - t):.0f} |", flush=True)


def budget(root: Path, size: int, batch: int, epochs: float, seconds: float) -> None:
    paths, y, classes = _split(root, "train")
    vp, vy, _ = _split(root, "val")
    pick = np.random.default_rng(0).permutation(len(vp))[:2000]
    vp, vy = [vp[i] for i in pick], [vy[i] for i in pick]
    model = _model(size, len(classes))
    cfg = FinetuneConfig(epochs=epochs, freeze_epochs=0, head_lr=2e-3, batch_size=batch, workers=2, quiet=True,
                         val_every=0.25, deadline=time.time() + seconds, reserve_s=0)
    d = tempfile.mkdtemp()
    t = time.perf_counter()
    res = fit_finetune(model, paths, y, vp[:500], vy[:500], cfg, d, History(None, "finetune"))
    took = time.perf_counter() - t
    tf, net, correct = EvalTransform(model.preprocessing), res.model.eval(), 0
    with torch.no_grad():
        for i in range(0, len(vp), 200):
            x = torch.stack([tf(decode(p)[0]) for p in vp[i:i + 200]])
            correct += int((net(x).argmax(1).numpy() == np.array(vy[i:i + 200])).sum())
    print(f"| {size} px | {batch} | {epochs:g} | {took:.0f} | {res.stopped_by_time} | {correct / len(vp):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("loop", "budget"))
    ap.add_argument("data", type=Path)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=0.45)
    ap.add_argument("--seconds", type=float, default=300)
    args = ap.parse_args()
    if args.what == "loop":
        loop(args.data, args.n)
    else:
        budget(args.data, args.size, args.batch, args.epochs, args.seconds)


if __name__ == "__main__":
    main()
