"""Planning a run: the input size from the data's own resolution, and what fits in a time budget.

A plan is made from costs measured on this machine in a few seconds (a forward pass and a training
step on synthetic batches at two sizes, and the decoding of a few of the user's files), not from a
table. With a time limit it chooses the largest input size at which extraction, the head, enough
fine-tuning and the final evaluation fit, and fewer fine-tuning epochs, or none, when they do not.
Without one it says how long the run will take before it starts.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.images import ImageInfo, load_image
from ..data.transforms import EvalTransform, Preprocessing, TrainTransform
from ..runtime import autocast, keep_freed_memory

__all__ = ["Plan", "Costs", "native_size", "useful_size", "candidate_sizes", "target_epochs", "measure_costs",
           "make_plan", "estimate", "epochs_fit", "sample_paths", "MIN_SIZE"]

#: Smallest input size planned: a stride-32 network still sees a 2x2 map at 64 px.
MIN_SIZE = 64
#: Upsampling beyond this factor of the images' own resolution adds compute, not information.
MAX_UPSAMPLE = 4
#: Share of the budget the plan fills; the rest absorbs estimation error.
BUDGET_FILL = 0.85
#: Fixed seconds for the report, the artifact and the process around them.
FIXED_S = 15.0
#: Fine-tuning on cached activations is planned as this many cached views of the training images ...
CACHED_VIEWS = 2
#: ... and this many epochs of the top stages ...
CACHED_EPOCHS = 15
#: ... each image of which costs at least this share of a whole training step.
CACHED_TOP_FLOOR = 0.2


def native_size(infos: dict[str, ImageInfo] | Sequence[ImageInfo]) -> int | None:
    """Median shorter side of the images (``None`` when unknown)."""
    values = infos.values() if isinstance(infos, dict) else infos
    sides = [min(i.width, i.height) for i in values if i.width and i.height]
    return int(statistics.median(sides)) if sides else None


def _round32(x: float) -> int:
    return int(max(MIN_SIZE, 32 * round(x / 32)))


def useful_size(native: int | None, default: int, finetune: bool = True) -> int:
    """The input size without a budget: the backbone's own size, except that for fine-tuning small images
    are upsampled at most :data:`MAX_UPSAMPLE` times (a 28 px image trains at 128, not 224). Frozen features
    alone (``finetune`` False: a head, prototypes) always use the backbone's own size: a frozen network is
    best at the scale it was trained at (Touvron et al., "Fixing the train-test resolution discrepancy",
    2019), and on every dataset of ``bench/accuracy.py`` the probe at 224 px beat 4x the images' size."""
    if native is None or not finetune:
        return default
    return min(default, _round32(MAX_UPSAMPLE * native))


def candidate_sizes(native: int | None, default: int) -> list[int]:
    """Sizes a budgeted plan may choose, largest first: multiples of 32 from the backbone's default size
    (or up to 1.5x it, for images larger than that) down to :data:`MIN_SIZE`."""
    top = default if native is None or native <= default else min(_round32(native), _round32(1.5 * default))
    sizes = list(range(top, MIN_SIZE - 1, -32))
    return sizes if sizes else [top]


def target_epochs(n_train: int) -> float:
    """Fine-tuning epochs worth planning for ``n_train`` images: enough to see 50,000 images, between 2
    and 8 epochs (small sets need several passes; large ones converge within two)."""
    return float(min(8.0, max(2.0, 50_000 / max(1, n_train))))


@dataclass
class Costs:
    """Seconds per image on this machine, by input size: ``eval`` (decode, forward pass) and ``train``
    (decode with augmentation, forward and backward pass, optimiser step)."""

    eval_s: dict[int, float]
    train_s: dict[int, float]

    def eval_at(self, size: int) -> float:
        """Interpolated per-image evaluation cost."""
        return _interp(self.eval_s, size)

    def train_at(self, size: int) -> float:
        """Interpolated per-image training cost."""
        return _interp(self.train_s, size)


def _interp(table: dict[int, float], size: int) -> float:
    """Cost as ``a + b * size**2`` through the two nearest measured sizes (compute grows with pixels,
    with a fixed per-image overhead)."""
    if size in table:
        return table[size]
    pts = sorted(table)
    if len(pts) == 1:
        return table[pts[0]] * (size / pts[0]) ** 2
    lo = max([p for p in pts if p < size], default=pts[0])
    hi = min([p for p in pts if p > size], default=pts[-1])
    if lo == hi:
        lo, hi = pts[0], pts[-1]
    b = (table[hi] - table[lo]) / (hi ** 2 - lo ** 2)
    return max(1e-6, table[lo] + b * (size ** 2 - lo ** 2))


def _time_it(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _decode_cost(paths: Sequence[str], transform: Any) -> float:
    """Median seconds to decode and transform one file (a few files, in this process)."""
    times = []
    for p in paths:
        t = time.perf_counter()
        try:
            transform(load_image(p, draft=getattr(transform, "draft", None)))
        except Exception:  # a bad file is the scan's business; it costs nothing to plan
            continue
        times.append(time.perf_counter() - t)
    return float(statistics.median(times)) if times else 0.0


def measure_costs(model: nn.Module, pre: Preprocessing, sizes: Sequence[int], sample_paths: Sequence[str], *,
                  batch_size: int = 32, trainable: Sequence[nn.Parameter] | None = None,
                  mixed_precision: bool = True, workers: int = 2, train: bool = True, train_bf16: bool = False) -> Costs:
    """Measure per-image costs at ``sizes`` on synthetic batches through ``model`` (uint8 NCHW in, logits
    out, on the CPU), plus decoding ``sample_paths``. ``trainable`` are the parameters a training step
    updates (default all). Decoding runs in ``workers`` processes beside the forward pass, so its cost
    counts for ``1 / (workers + 1)`` of its time. The training step runs in fp32, as the CPU trains,
    or in bf16 with ``train_bf16`` (``precision_for``'s ``cpu_bf16``). Restores the parameters' ``requires_grad`` and weights.
    """
    keep_freed_memory()
    device = torch.device("cpu")
    params = list(model.parameters())
    saved_grad = [p.requires_grad for p in params]
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if train else {}
    was_training = model.training
    model = model.to(memory_format=torch.channels_last)
    live = {id(p) for p in (trainable if trainable is not None else params)}
    share = 1.0 / (max(0, workers) + 1)
    eval_s, train_s = {}, {}
    try:
        for size in sorted(set(sizes)):
            x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last)
            sized = Preprocessing(size, pre.crop_pct, pre.mean, pre.std, pre.interpolation)
            model.eval()

            def forward() -> None:
                with torch.inference_mode(), autocast(device, mixed_precision):
                    model(x)

            eval_s[size] = _time_it(forward, 2) / batch_size + share * _decode_cost(sample_paths, EvalTransform(sized))
            if not train:
                continue
            for p in params:
                p.requires_grad_(id(p) in live)
            opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=0.0)
            y = torch.randint(0, 2, (batch_size,))

            def step() -> None:  # fp32, as precision_for trains on the CPU (bf16 where asked)
                with autocast(device, train_bf16):
                    loss = nn.functional.cross_entropy(model(x).float()[:, :2], y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            aug = _decode_cost(sample_paths, TrainTransform(sized, "light"))
            train_s[size] = _time_it(step, 2) / batch_size + share * aug
    finally:
        for p, g in zip(params, saved_grad):
            p.requires_grad_(g)
            p.grad = None
        if saved_state:
            model.load_state_dict(saved_state)
        model.train(was_training)
    return Costs(eval_s, train_s)


@dataclass
class Plan:
    """What a run will do and how long each part should take (seconds), with the reasons.

    ``image_size``: input size. ``finetune``: whether fine-tuning runs; ``epochs`` of it (a fraction is
    a share of one epoch) and ``val_every`` (the share of an epoch between validation passes).
    ``estimate``: seconds per part; ``budget_s``: the time limit, if any.
    """

    image_size: int
    native_size: int | None
    finetune: bool
    epochs: float
    val_every: float = 1.0
    budget_s: float | None = None
    estimate: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    task: str = "single"  # or "multilabel"
    race: dict[str, Any] | None = None  # the race of training recipes (transferlab.strategy), once run
    decisions: dict[str, Any] = field(default_factory=dict)  # what was judged before fine-tuning, with its figures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (kept in ``metrics.json`` as ``plan``)."""
        d = asdict(self)
        d["estimate"] = {k: round(v, 1) for k, v in self.estimate.items()}
        return d

    def describe(self) -> list[str]:
        """Lines for the terminal."""
        est = self.estimate
        ft = (f"fine-tune {self.epochs:g} epoch(s), ~{est.get('finetune_epoch', 0):.0f}s each"
              if self.finetune else "no fine-tuning")
        budget = f" of a {self.budget_s:.0f}s budget" if self.budget_s else ""
        native = f" (images ~{self.native_size}px)" if self.native_size else ""
        task = "multi-label (sigmoid outputs, binary cross-entropy, a threshold per label); " \
            if self.task == "multilabel" else ""
        lines = [f"plan: {task}{self.image_size}px input{native}; {ft}; estimated {est.get('total', 0):.0f}s{budget}"]
        lines += [f"  {r}" for r in self.reasons]
        lines += [f"  {d['line']}" for d in self.decisions.values() if d.get("line")]
        return lines


def make_plan(*, native: int | None, default_size: int, n_extract: int, n_train: int, n_val: int, n_test: int,
              costs: Costs, finetune: bool, budget_s: float | None, elapsed_s: float = 0.0,
              max_epochs: int = TrainConfig.ft_epochs, image_size: int | None = None, head_s: float = 5.0,
              cached: bool = False) -> Plan:
    """Choose the input size and the fine-tuning length.

    Args:
        native: the images' median shorter side. default_size: the backbone's input size.
        n_extract: images whose features are not cached yet. n_train/n_val/n_test: split sizes.
        costs: measured per-image costs (:func:`measure_costs`) at the sizes that may be chosen.
        finetune: whether the mode fine-tunes at all. budget_s: the time limit (``None``: no limit).
        elapsed_s: seconds of the budget already spent. max_epochs: at most this many epochs.
        image_size: the user's ``--image-size`` (then only the fine-tuning length is planned).
        cached: fine-tuning trains the top stages on cached activations (``costs.train_s`` measured with
            those stages trainable): :data:`CACHED_VIEWS` views of the training images are cached once, and
            :data:`CACHED_EPOCHS` epochs, each costing a training step less a forward pass, are wanted.
    """
    reasons: list[str] = []
    useful = useful_size(native, default_size, finetune)
    if image_size:
        sizes = [image_size]
        reasons.append(f"input size {image_size}px as asked (--image-size)")
    elif budget_s is None:
        sizes = [useful]
        if useful != default_size:
            reasons.append(f"input size {useful}px: {MAX_UPSAMPLE}x the images' own {native}px "
                           f"(the backbone's {default_size}px would cost {(default_size / useful) ** 2:.1f}x)")
        elif not finetune and native and native * MAX_UPSAMPLE < default_size:
            reasons.append(f"input size {default_size}px, the backbone's own, for frozen features (the images "
                           f"are ~{native}px): a frozen network is most accurate at the size it was trained at")
    else:
        sizes = [s for s in candidate_sizes(native, default_size)]
    want = min(float(max_epochs), target_epochs(n_train)) if budget_s is not None else float(max_epochs)
    if cached:
        want = float(CACHED_EPOCHS)

    def cost(size: int, epochs: float) -> dict[str, float]:
        return estimate(costs, size, epochs, n_extract=n_extract, n_train=n_train, n_val=n_val, n_test=n_test,
                        head_s=head_s, elapsed_s=elapsed_s, budget_s=budget_s, cached=cached)

    if budget_s is None:
        size = sizes[0]
        epochs = float(max_epochs) if finetune else 0.0
        return Plan(size, native, finetune, epochs, _val_every(n_train, n_val, costs, size, None), None,
                    cost(size, epochs), reasons)
    room = BUDGET_FILL * budget_s
    if finetune:
        for size in sizes:  # the largest size at which the wanted epochs fit
            if cost(size, want)["total"] <= room:
                if not image_size:
                    what = f"{want:g} epochs of the top stages on {CACHED_VIEWS} cached views" if cached else \
                        f"{want:g} fine-tuning epochs"
                    reasons.append(f"input size {size}px: the largest at which {what} fit"
                                   + (f" (the images are ~{native}px)" if native else ""))
                return Plan(size, native, True, want, _val_every(n_train, n_val, costs, size, budget_s), budget_s,
                            cost(size, want), reasons)
        size = sizes[-1]  # none fits: the smallest size, and as much fine-tuning as fits
        epochs = math.floor(10 * epochs_fit(costs, size, n_extract=n_extract, n_train=n_train, n_val=n_val,
                                            n_test=n_test, head_s=head_s, elapsed_s=elapsed_s, budget_s=budget_s,
                                            cached=cached)) / 10
        if epochs >= 0.5:
            reasons.append(f"input size {size}px and {epochs:g} of the {want:g} fine-tuning epochs wanted: "
                           "all that fits in the budget")
            return Plan(size, native, True, epochs, _val_every(n_train, n_val, costs, size, budget_s), budget_s,
                        cost(size, epochs), reasons)
        reasons.append("no fine-tuning: less than half an epoch would fit in the budget after extraction")
    for size in sizes:  # head only: the largest size whose extraction fits
        if cost(size, 0.0)["total"] <= room or size == sizes[-1]:
            return Plan(size, native, False, 0.0, 1.0, budget_s, cost(size, 0.0), reasons)
    raise AssertionError("unreachable: the last size is always returned")


def estimate(costs: Costs, size: int, epochs: float, *, n_extract: int, n_train: int, n_val: int, n_test: int,
             head_s: float, elapsed_s: float, budget_s: float | None, cached: bool = False) -> dict[str, float]:
    """Seconds per part of a run at input ``size`` with ``epochs`` of fine-tuning (see :func:`make_plan`)."""
    val_every = _val_every(n_train, n_val, costs, size, budget_s)
    passes = math.ceil(max(epochs, 1e-9) / val_every) if epochs else 0
    est = {"extract": n_extract * costs.eval_at(size), "head": head_s,
           "finetune_epoch": n_train * costs.train_at(size) + (n_val * costs.eval_at(size) / val_every),
           "evaluate": (n_val + n_test) * costs.eval_at(size) + FIXED_S}
    est["finetune"] = epochs * n_train * costs.train_at(size) + passes * n_val * costs.eval_at(size)
    if cached:  # views cached once, then epochs of the top stages alone (a training step less a forward pass)
        top = max(CACHED_TOP_FLOOR * costs.train_at(size), costs.train_at(size) - costs.eval_at(size))
        est["cache"] = (CACHED_VIEWS * n_train + n_val) * costs.eval_at(size)
        est["finetune_epoch"] = n_train * top
        est["finetune"] = est["cache"] + epochs * n_train * top if epochs else 0.0
    est["total"] = elapsed_s + est["extract"] + est["head"] + est["finetune"] + est["evaluate"]
    return est


def epochs_fit(costs: Costs, size: int, *, n_extract: int, n_train: int, n_val: int, n_test: int,
               head_s: float, elapsed_s: float, budget_s: float, cached: bool = False) -> float:
    """Fine-tuning epochs (of the parameters ``costs`` was measured with trainable; ``cached``: on cached
    activations, whose caching is paid first) that fit in the share of ``budget_s`` the plan fills, at input
    ``size``, after extraction, the head and the evaluation."""
    base = estimate(costs, size, 0.0, n_extract=n_extract, n_train=n_train, n_val=n_val, n_test=n_test,
                    head_s=head_s, elapsed_s=elapsed_s, budget_s=budget_s, cached=cached)
    per_epoch = base["finetune_epoch"]
    spare = BUDGET_FILL * budget_s - base["total"] - base.get("cache", 0.0)
    return max(0.0, spare) / per_epoch if per_epoch > 0 else 0.0


def _val_every(n_train: int, n_val: int, costs: Costs, size: int, budget_s: float | None) -> float:
    """Share of an epoch between validation passes: every epoch, or more often when an epoch is long
    (a tenth of the budget, or 3 minutes without one), so a fine-tuning that does not pay is seen early."""
    if n_val == 0:
        return 1.0
    epoch_s = n_train * costs.train_at(size)
    every_s = budget_s / 10 if budget_s else 180.0
    if epoch_s <= every_s:
        return 1.0
    return float(max(0.1, math.floor(10 * every_s / epoch_s) / 10))


def sample_paths(paths: Sequence[str], n: int = 8, seed: int = 0) -> list[str]:
    """A few paths, evenly spread and seeded, for measuring decoding."""
    if len(paths) <= n:
        return list(paths)
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]
