"""Epochs per CPU-minute: fine-tuning end to end from the files against the top stages on cached activations.

    python bench/bench_cached.py [--dataset fm100-300px] [--size 224] [--epochs 5] [--out /tmp/transferlab-accuracy]
    TRANSFERLAB_NO_BF16=1 python bench/bench_cached.py ...     # the path of a CPU without native bf16

On one dataset (built as bench/accuracy.py builds it), side by side in one process at one input size:
today's fine-tuning (`fit_finetune`, the default recipe: every epoch decodes, augments and runs the whole
network forward and backward) for one epoch, and the fit on cached activations (`fit_cached`) for
``--epochs`` epochs after caching its views, each from the same trained-head start. Prints seconds per epoch,
epochs per CPU-minute of each, the seconds to cache one view, and the ratio; both validate every epoch.
Not part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build  # noqa: E402

import torch  # noqa: E402

from transferlab.backbones import build_head, create_backbone  # noqa: E402
from transferlab.backbones.models import Classifier  # noqa: E402
from transferlab.data.scan import scan  # noqa: E402
from transferlab.data.split import split_dataset  # noqa: E402
from transferlab.runtime import cpu_has_bf16  # noqa: E402
from transferlab.training import cached  # noqa: E402
from transferlab.training.callbacks import History  # noqa: E402
from transferlab.training.finetune import FinetuneConfig, fit_finetune  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fm100-300px")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="/tmp/transferlab-accuracy")
    args = ap.parse_args()
    ds = split_dataset(scan(build(args.dataset, Path(args.out))), 0.15, 0.15, 0)
    classes = ds.classes
    xy = {sp: ([s.path for s in ds.samples if s.split == sp], [classes.index(s.label) for s in ds.samples
                                                               if s.split == sp]) for sp in ("train", "val")}
    backbone, info = create_backbone("efficientnet_lite0")
    model = Classifier(backbone, build_head(info.num_features, len(classes)), replace(info.preprocessing,
                                                                                       size=args.size))
    cfg = FinetuneConfig(epochs=1.0, freeze_epochs=0, workers=2, quiet=True, seed=0)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}"
          f"{' (TRANSFERLAB_NO_BF16=1)' if os.environ.get('TRANSFERLAB_NO_BF16') else ''}; {args.dataset}: "
          f"{len(xy['train'][0])} training, {len(xy['val'][0])} validation images at {args.size} px", flush=True)
    t = time.perf_counter()
    fit_finetune(copy.deepcopy(model), *xy["train"], *xy["val"], cfg, tempfile.mkdtemp(), History(None, "ft"))
    full_s = time.perf_counter() - t
    cached.EPOCHS_NO_LIMIT = args.epochs
    ft = cached.fit_cached(copy.deepcopy(model), *xy["train"], *xy["val"], replace(cfg, cached=True),
                           Path(tempfile.mkdtemp()), History(None, "ft"))
    rec = ft.cached
    top_epoch_s = 60.0 / rec["epochs_per_minute"]
    view_s = rec["seconds_per_view_image"] * rec["rows"]
    with_cache = args.epochs / ((rec["fit_seconds"] + rec["cache_seconds"]) / 60.0)
    print(f"{'':<44}{'s/epoch':>10}{'epochs/CPU-min':>16}")
    print(f"{'end to end from the files (today)':<44}{full_s:>10.1f}{60.0 / full_s:>16.2f}")
    print(f"{'top stages on cached activations':<44}{top_epoch_s:>10.1f}{rec['epochs_per_minute']:>16.2f}"
          f"   ({rec['epochs_per_minute'] * full_s / 60.0:.1f}x)")
    print(f"{'  the same, caching its views counted':<44}{60.0 / with_cache:>10.1f}{with_cache:>16.2f}"
          f"   ({with_cache * full_s / 60.0:.1f}x; {rec['views']} views at {view_s:.1f}s each, "
          f"BatchNorm race {ft.decisions.get('bn_policy', {}).get('seconds', 0)}s)")


if __name__ == "__main__":
    main()
