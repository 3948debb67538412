"""Fine-tuning the top of a pretrained network on cached activations of its frozen lower stages.

The stages below the network's last output stride run once per training image and augmented view (and once
per validation image); their activations are kept, in memory up to a budget and memory-mapped on disk
beyond it, and the top stages with the head then train on them for many epochs: an epoch costs only the
top stages' forward and backward passes, with no decoding. Each epoch draws one of the cached views of
every image. Before the long fit, the BatchNorm policy of the trained stages (ImageNet's statistics frozen,
or adapted to the data) is raced for a few epochs on the same activations and judged on validation.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from .._progress import progress_bar
from ..backbones.models import Classifier
from ..data.loader import ImageFiles, collate_images, worker_init
from ..data.transforms import EvalTransform, TrainTransform
from ..events import emit
from ..probability import calibrated_nll
from ..runtime import autocast, keep_freed_memory, training_device
from .callbacks import History
from .datamodule import TrainFiles
from .finetune import WARMUP, FinetuneConfig, FinetuneResult, backbone_stages, batch_mixer, mixes, param_groups, \
    stochastic_depth
from .module import WarmupCosine

__all__ = ["TopSplit", "split_top", "trains_cached", "fit_cached", "ActivationStore", "MAX_EPOCHS", "MAX_VIEWS"]

#: The long fit trains at most this many epochs (an epoch is one cached view of every training image).
MAX_EPOCHS = 40
#: Without a time limit the fit trains this many epochs and keeps its best validated weights.
EPOCHS_NO_LIMIT = 20
#: At most this many augmented views of each training image are cached ...
MAX_VIEWS = 8
#: ... and without a limit this many.
VIEWS_NO_LIMIT = 4
#: With a limit, caching the augmented views beyond the first may take this share of the fit's time.
VIEWS_SHARE = 0.25
#: The BatchNorm race trains each policy this many epochs, within this share of the fit's time.
RACE_EPOCHS, RACE_SHARE = 2.0, 0.12
#: Activations are kept in memory up to this share of the machine's available memory, on disk beyond.
MEMORY_SHARE = 0.25
#: Validation and extraction batches (forward passes only).
EVAL_BATCH = 64


@dataclass
class TopSplit:
    """A classifier cut where its last output stride begins: ``lower`` maps uint8 pixels to the activations
    that are cached (frozen), ``upper`` maps them to logits (trained). Both share the classifier's modules,
    so training ``upper`` trains the classifier. ``cut``: blocks in the lower part."""

    lower: nn.Module
    upper: nn.Module
    cut: int


class _Lower(nn.Module):
    def __init__(self, model: Classifier, cut: int) -> None:
        super().__init__()
        inner = model.backbone.model
        self.normalize, self.conv_stem, self.bn1 = model.normalize, inner.conv_stem, inner.bn1
        self.blocks = nn.Sequential(*inner.blocks[:cut])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(self.normalize(x))))


class _Upper(nn.Module):
    def __init__(self, model: Classifier, cut: int) -> None:
        super().__init__()
        inner = model.backbone.model
        self.blocks = nn.Sequential(*inner.blocks[cut:])
        self.conv_head, self.bn2, self.global_pool = inner.conv_head, inner.bn2, inner.global_pool
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.bn2(self.conv_head(self.blocks(x)))).flatten(1))


def trains_cached(model: Classifier, accelerator: str) -> bool:
    """Whether ``model`` can fine-tune on cached activations with this ``--accelerator``: on the CPU, where
    caching pays (a GPU runs the whole network cheaply), and a network :func:`split_top` can cut."""
    return training_device(accelerator) == "cpu" and split_top(model) is not None


def split_top(model: Classifier) -> TopSplit | None:
    """The classifier cut before the blocks at its last output stride (``None`` for a network of another
    shape than timm's EfficientNet/MobileNet family, or one already cut with ``cut_stage``)."""
    inner = getattr(model.backbone, "model", None)
    if getattr(model.backbone, "cut_stage", None) is not None or not all(
            hasattr(inner, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "feature_info")):
        return None
    info = list(inner.feature_info)
    below = [f for f in info if f["reduction"] < info[-1]["reduction"]]
    if not below or not str(below[-1]["module"]).startswith("blocks."):
        return None
    cut = int(str(below[-1]["module"]).split(".")[1]) + 1
    if cut >= len(inner.blocks):
        return None
    return TopSplit(_Lower(model, cut), _Upper(model, cut), cut)


class ActivationStore:
    """Float16 activations by view, each ``(rows, C, H, W)``: in memory while they fit ``memory_bytes``,
    else a memory-mapped file in ``folder`` (removed by :meth:`close`)."""

    def __init__(self, shape: Sequence[int], folder: Path, memory_bytes: float) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.folder, self.memory_left = folder, float(memory_bytes)
        self.views: list[torch.Tensor] = []
        self.on_disk = 0

    def new_view(self, rows: int) -> torch.Tensor:
        """Room for one view of ``rows`` images (zeros)."""
        size = rows * int(np.prod(self.shape)) * 2
        if size <= self.memory_left:
            self.memory_left -= size
            t = torch.zeros((rows, *self.shape), dtype=torch.float16)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            mm = np.memmap(self.folder / f"view{len(self.views)}.f16", dtype=np.float16, mode="w+",
                           shape=(rows, *self.shape))
            t = torch.from_numpy(mm)
            self.on_disk += 1
        self.views.append(t)
        return t

    def gather(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Float32 batch: row ``rows[i]`` of view ``views[i]``."""
        out = torch.empty((len(rows), *self.shape), dtype=torch.float32)
        for v in views.unique().tolist():
            mask = views == v
            out[mask] = self.views[v][rows[mask]].float()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes the views hold, in memory and on disk."""
        return sum(v.numel() * 2 for v in self.views)

    def close(self) -> None:
        """Drop the views and remove their files."""
        self.views = []
        shutil.rmtree(self.folder, ignore_errors=True)


def _available_memory() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 4e9


def _fill(lower: nn.Module, dataset: Any, out: torch.Tensor, cfg: FinetuneConfig, bar: Any) -> np.ndarray:
    """Run ``lower`` over ``dataset`` into ``out``; returns which rows decoded."""
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, num_workers=cfg.workers,
                        collate_fn=collate_images, worker_init_fn=worker_init if cfg.workers else None)
    ok = np.zeros(len(out), dtype=bool)
    device = torch.device("cpu")
    with torch.inference_mode(), autocast(device, cfg.mixed_precision):
        for x, idx, _, bad in loader:
            if x.numel():
                a = lower(x.contiguous(memory_format=torch.channels_last)).float()
                out[idx] = a.to(torch.float16)
                ok[idx.numpy()] = True
            bar.advance(len(idx) + len(bad))
    return ok


@dataclass
class _Data:
    store: ActivationStore
    y: torch.Tensor  # labels of the training rows
    rows: torch.Tensor  # the training rows that decoded
    val: torch.Tensor  # validation activations (float16)
    val_y: torch.Tensor


def _cache(split: TopSplit, model: Classifier, train: tuple[Sequence[str], Sequence[int]],
           val: tuple[Sequence[str], Sequence[int]], cfg: FinetuneConfig, run_dir: Path,
           views_for: Callable[[float], int]) -> tuple[_Data, dict[str, Any]]:
    """Validation activations, one augmented view of the training images, then as many more views as
    ``views_for(seconds per image)`` says."""
    pre = model.preprocessing
    split.lower.eval()
    with torch.no_grad():
        shape = split.lower(torch.zeros(1, 3, pre.size, pre.size, dtype=torch.uint8)).shape[1:]
    store = ActivationStore(shape, run_dir / "activations", MEMORY_SHARE * _available_memory())
    paths, labels = list(train[0]), list(train[1])
    n = len(paths)
    t0 = time.perf_counter()
    val_out = torch.zeros((len(val[0]), *shape), dtype=torch.float16)
    with progress_bar("caching activations (validation, view 1)", len(val[0]) + n, cfg.quiet) as bar:
        val_ok = _fill(split.lower, ImageFiles(list(val[0]), EvalTransform(pre), list(val[1])), val_out, cfg, bar)
        files = TrainFiles(paths, TrainTransform(pre, cfg.augment), labels, cfg.seed)
        t1 = time.perf_counter()
        ok = _fill(split.lower, Subset(files, range(n)), store.new_view(n), cfg, bar)
        per_image = (time.perf_counter() - t1) / max(1, n)
    views = max(1, min(MAX_VIEWS, views_for(per_image)))
    if views > 1:
        with progress_bar(f"caching activations (views 2-{views})", (views - 1) * n, cfg.quiet) as bar:
            for v in range(1, views):
                got = _fill(split.lower, Subset(files, range(v * n, (v + 1) * n)), store.new_view(n), cfg, bar)
                missing = np.flatnonzero(ok & ~got)  # a file that decoded once keeps its first view there
                if len(missing):
                    store.views[v][missing] = store.views[0][missing]
    rows, val_rows = torch.as_tensor(np.flatnonzero(ok)), torch.as_tensor(np.flatnonzero(val_ok))
    data = _Data(store, torch.as_tensor(labels), rows, val_out[val_rows], torch.as_tensor(list(val[1]))[val_rows])
    record = {"cut_blocks": split.cut, "shape": list(shape), "views": views, "rows": int(len(rows)),
              "bytes": store.nbytes, "on_disk": store.on_disk > 0,
              "cache_seconds": round(time.perf_counter() - t0, 1), "seconds_per_view_image": round(per_image, 5)}
    return data, record


class _Fit:
    """One schedule on the cached activations: warm-up and cosine over ``steps``, validation at every
    epoch's end and at the last step; the best (lowest calibrated loss) and final weights are kept."""

    def __init__(self, split: TopSplit, data: _Data, cfg: FinetuneConfig, groups: list[dict[str, Any]],
                 steps: int, train_bn: bool, mix: Any, seed: int, phase: str, history: History | None) -> None:
        self.split, self.data, self.cfg, self.train_bn, self.mix = split, data, cfg, train_bn, mix
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = WarmupCosine(steps, int(round(WARMUP * steps)))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.schedule)
        self.steps, self.step, self.seed, self.phase, self.history = steps, 0, seed, phase, history
        self.validations: list[dict[str, Any]] = []
        self.best: float = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = -1
        self.t0 = time.perf_counter()
        self.weights = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32)

    @property
    def batches(self) -> int:
        n, b = len(self.data.rows), self.cfg.batch_size
        return max(1, n // b if n > b else 1)

    def _mode(self) -> None:
        self.split.upper.train()
        if not self.train_bn:
            for m in self.split.upper.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's rows, shuffled, and the view each is drawn from (seeded by the epoch)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = self.data.rows[torch.randperm(len(self.data.rows), generator=g)]
        return order, torch.randint(0, len(self.data.store.views), (len(order),), generator=g)

    def train_batch(self, rows: torch.Tensor, views: torch.Tensor) -> tuple[float, int]:
        """One optimiser step on these rows; returns the summed loss and the correct predictions."""
        x = self.data.store.gather(rows, views).contiguous(memory_format=torch.channels_last)
        y = self.data.y[rows]
        loss, logits = self._loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]], self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return float(loss.detach()) * len(y), int((logits.detach().argmax(1) == y).sum())

    def time_batches(self, k: int) -> float:
        """Seconds per training batch over ``k`` steps (the caller restores the weights)."""
        self._mode()
        order, views = self._order(0)
        b = self.cfg.batch_size
        t = time.perf_counter()
        for i in range(k):
            self.train_batch(order[i * b:(i + 1) * b], views[i * b:(i + 1) * b])
        return (time.perf_counter() - t) / k

    def run(self, until: float | None) -> bool:
        """Train to the schedule's end, or until ``time.time()`` passes ``until``; returns True when stopped
        by the time."""
        epoch = self.step // self.batches
        b = self.cfg.batch_size
        while self.step < self.steps:
            order, views = self._order(epoch)
            t_epoch, losses, hits, seen = time.perf_counter(), 0.0, 0, 0
            self._mode()
            for i in range(self.batches):
                if self.step >= self.steps:
                    break
                if until is not None and time.time() > until:
                    self.validate(epoch, t_epoch, losses, hits, seen)
                    return True
                rows = order[i * b:(i + 1) * b]
                loss, hit = self.train_batch(rows, views[i * b:(i + 1) * b])
                losses, hits, seen = losses + loss, hits + hit, seen + len(rows)
                emit("step", every_s=0.5, phase=self.phase, epoch=epoch + 1, batch=i + 1, batches=self.batches,
                     global_step=self.step, max_steps=self.steps)
            self.validate(epoch, t_epoch, losses, hits, seen)
            epoch += 1
        return False

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is not None and len(y) % 2 == 0:
            x, soft = self.mix(x, y)
            logits = self.split.upper(x)
            return F.cross_entropy(logits, soft, weight=self.weights), logits
        logits = self.split.upper(x)
        return F.cross_entropy(logits, y, weight=self.weights, label_smoothing=self.cfg.label_smoothing), logits

    def predict_val(self) -> torch.Tensor:
        """Validation probabilities of the current weights."""
        self.split.upper.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.data.val), EVAL_BATCH):
                x = self.data.val[i:i + EVAL_BATCH].float().contiguous(memory_format=torch.channels_last)
                out.append(torch.softmax(self.split.upper(x).float(), 1))
        return torch.cat(out) if out else torch.empty(0)

    def validate(self, epoch: int, t_epoch: float, losses: float, hits: int, seen: int) -> None:
        """Score the validation activations; keep the weights when they are the best so far."""
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": self.phase, "train_loss": losses / max(1, seen),
                               "train_acc": hits / max(1, seen), "val_loss": math.nan, "val_acc": math.nan,
                               "lr": float(self.opt.param_groups[-1]["lr"])}
        if len(self.data.val):
            probs = self.predict_val()
            y = self.data.val_y
            acc = float((probs.argmax(1) == y).float().mean())
            cal = calibrated_nll(probs.double().numpy(), y.numpy())
            row["val_loss"] = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), y))
            row["val_acc"] = acc
            better = cal < self.best
            self.validations.append({"step": self.step, "epoch": round(self.step / self.batches, 3),
                                     "seconds": round(time.perf_counter() - self.t0, 2), "val_cal_loss": cal,
                                     "val_acc": acc, "best": better})
            if better:
                self.best, self.best_epoch = cal, epoch
                self.best_state = _upper_state(self.split)
        row["seconds"] = round(time.perf_counter() - t_epoch, 3)
        if self.history is not None:
            self.history.rows.append(row)
            self.history.write()


def _upper_state(split: TopSplit) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in split.upper.state_dict().items()}


def _groups(model: Classifier, split: TopSplit, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """The fine-tuning's discriminative rates (:func:`param_groups`), restricted to the top stages and the head."""
    live = {id(p) for p in split.upper.parameters()}
    groups = []
    for g in param_groups(model, backbone_stages(model.backbone), cfg):
        params = [p for p in g["params"] if id(p) in live]
        if params:
            groups.append({**g, "params": params})
    return groups


def fit_cached(model: Classifier, train_paths: Sequence[str], train_y: Sequence[int], val_paths: Sequence[str],
               val_y: Sequence[int], cfg: FinetuneConfig, run_dir: str | os.PathLike[str],
               history: History) -> FinetuneResult:
    """Fine-tune the top stages and the head of ``model`` on cached activations of its lower stages (the
    module docstring). ``cfg.deadline`` bounds caching, the BatchNorm race and the fit, whose schedule then
    fills the time left (a fractional last epoch included); without one it plans :data:`EPOCHS_NO_LIMIT`
    epochs. Like :func:`~transferlab.training.finetune.fit_finetune`, a fit whose best validation does not
    beat ``cfg.initial_val_loss`` leaves the starting model. Raises ``ValueError`` for a network
    :func:`split_top` cannot cut."""
    split = split_top(model)
    if split is None:
        raise ValueError("this network cannot be cut for training on cached activations")
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    keep_freed_memory()
    t_start = time.perf_counter()

    def left() -> float | None:
        return None if cfg.deadline is None else cfg.deadline - cfg.reserve_s - time.time()

    def views_for(per_image: float) -> int:
        room = left()
        if room is None:
            return VIEWS_NO_LIMIT
        return 1 + int(VIEWS_SHARE * max(0.0, room) / max(1e-6, per_image * len(train_paths)))

    grads = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in split.upper.parameters():
        p.requires_grad_(True)
    model = model.to(memory_format=torch.channels_last)
    try:
        data, record = _cache(split, model, (train_paths, train_y), (val_paths, val_y), cfg, run_dir, views_for)
        start = _upper_state(split)
        n_classes = [m for m in split.upper.head.modules() if isinstance(m, nn.Linear)][-1].out_features
        with stochastic_depth(model.backbone, cfg.drop_path):
            policy, race = _race_bn(split, data, model, cfg, start, n_classes, left)
            split.upper.load_state_dict(start)
            fit, stopped_by_time, planned = _long_fit(split, data, model, cfg, start, policy, n_classes, left,
                                                      history)
    finally:  # the activations go, on a crash too; the network's parameters train as they did before
        shutil.rmtree(run_dir / "activations", ignore_errors=True)
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), True))
    seconds = time.perf_counter() - t_start
    improved = fit.best < (cfg.initial_val_loss if cfg.initial_val_loss is not None else math.inf) \
        or not len(data.val)
    ran_out = fit.step >= fit.steps and cfg.keep_final
    unkept = unkept_val = None
    if not improved:
        unkept = copy.deepcopy(model).eval()  # the fine-tuned network that lost to its start, for its test figure
        split_top(unkept).upper.load_state_dict(fit.best_state or _upper_state(split))
        if fit.validations:
            unkept_val = min(fit.validations, key=lambda v: v["val_cal_loss"]) if fit.best_state is not None \
                else fit.validations[-1]
        split.upper.load_state_dict(start)
    elif not ran_out and fit.best_state is not None:
        split.upper.load_state_dict(fit.best_state)
    fit_s = time.perf_counter() - fit.t0
    record.update({"bn_policy": "adapt" if policy else "frozen", "epochs_planned": round(planned, 2),
                   "epochs_per_minute": round(60 * fit.step / fit.batches / max(1e-6, fit_s), 2),
                   "fit_seconds": round(fit_s, 1), "seconds": round(seconds, 1)})
    model.eval()
    return FinetuneResult(model, history.rows, fit.best_epoch + 1, math.ceil(fit.step / fit.batches),
                          stopped_by_time, validations=fit.validations, improved=improved,
                          kept_weights="final" if ran_out and improved else "best",
                          mixup=fit.mix is not None, drop_path=cfg.drop_path, cached=record,
                          decisions={"bn_policy": race} if race else {}, unkept=unkept, unkept_val=unkept_val)


def _mixer(cfg: FinetuneConfig, epochs: float, n_classes: int) -> Any:
    return batch_mixer(n_classes, cfg.label_smoothing) if mixes(replace(cfg, epochs=epochs)) else None


def _race_bn(split: TopSplit, data: _Data, model: Classifier, cfg: FinetuneConfig, start: dict[str, torch.Tensor],
             n_classes: int, left: Callable[[], float | None]) -> tuple[bool, dict[str, Any] | None]:
    """Frozen or adapted BatchNorm statistics in the top stages: each trains :data:`RACE_EPOCHS` epochs (fewer
    when that would take more than :data:`RACE_SHARE` of the time left) from the same start; the lower
    calibrated validation loss wins. Without validation images the statistics stay frozen."""
    if not len(data.val):
        return False, None
    t0 = time.perf_counter()
    room = left()
    probe = _Fit(split, data, cfg, _groups(model, split, cfg), 1, False, None, cfg.seed, "race", None)
    batches, epochs = probe.batches, RACE_EPOCHS
    if room is not None:  # a few timed batches size the race
        per_batch = probe.time_batches(min(3, batches))
        split.upper.load_state_dict(start)
        epochs = min(RACE_EPOCHS, RACE_SHARE * max(0.0, room) / 2 / max(1e-6, per_batch * batches))
    steps = int(epochs * batches)
    if steps < max(4, batches // 4):
        return False, {"chosen": "frozen", "line": "BatchNorm: ImageNet's statistics kept (no time to race the "
                       "policies)", "seconds": round(time.perf_counter() - t0, 1)}
    scores = {}
    for name, train_bn in (("frozen", False), ("adapt", True)):
        split.upper.load_state_dict(start)
        fit = _Fit(split, data, cfg, _groups(model, split, cfg), steps, train_bn, _mixer(cfg, epochs, n_classes),
                   cfg.seed, "race", None)
        fit.run(None)
        best = min(fit.validations, key=lambda v: v["val_cal_loss"])
        scores[name] = {"val_cal_loss": round(best["val_cal_loss"], 4), "val_acc": round(best["val_acc"], 4)}
    chosen = min(scores, key=lambda k: scores[k]["val_cal_loss"])
    frozen, adapt = scores["frozen"], scores["adapt"]
    line = (f"BatchNorm in the trained stages: {chosen} (raced {steps / batches:.1f} epochs each on cached "
            f"activations: frozen val acc {frozen['val_acc']:.3f}, loss {frozen['val_cal_loss']:.3f}; "
            f"adapted {adapt['val_acc']:.3f}, {adapt['val_cal_loss']:.3f})")
    if not cfg.quiet:
        print(line, flush=True)
    return chosen == "adapt", {"chosen": chosen, "epochs": round(steps / batches, 2), **scores, "line": line,
                               "seconds": round(time.perf_counter() - t0, 1)}


def _long_fit(split: TopSplit, data: _Data, model: Classifier, cfg: FinetuneConfig, start: dict[str, torch.Tensor],
              train_bn: bool, n_classes: int, left: Callable[[], float | None],
              history: History) -> tuple[_Fit, bool, float]:
    """The fit itself: with a deadline, as many epochs (up to :data:`MAX_EPOCHS`) as the time left holds at
    the speed of a first timed stretch; without one :data:`EPOCHS_NO_LIMIT`."""
    probe = _Fit(split, data, cfg, _groups(model, split, cfg), 1, train_bn, None, cfg.seed, "finetune", None)
    batches = probe.batches
    room = left()
    epochs = float(EPOCHS_NO_LIMIT)
    if room is not None:  # a few timed batches and a validation pass size the schedule
        tb = time.perf_counter()
        per_batch = probe.time_batches(min(3, batches))
        split.upper.load_state_dict(start)
        tv = time.perf_counter()
        probe.predict_val()
        per_epoch = per_batch * batches + (time.perf_counter() - tv)
        epochs = min(float(MAX_EPOCHS), 0.95 * max(0.0, room - (time.perf_counter() - tb)) / per_epoch)
    steps = max(1, int(epochs * batches))
    fit = _Fit(split, data, cfg, _groups(model, split, cfg), steps, train_bn, _mixer(cfg, epochs, n_classes),
               cfg.seed, "finetune", history)
    until = cfg.deadline - cfg.reserve_s if cfg.deadline is not None else None
    return fit, fit.run(until), epochs
