"""End-to-end fine-tuning on Lightning: staged unfreezing, discriminative learning rates, BatchNorm
statistics frozen, augmentation on the fly, validation inside long epochs, checkpoints, resume, time
limits and DDP.

Defaults follow fastai's ``fine_tune``: after the head, the network trains with learning rates spread
geometrically from ``lr/100`` at the stem to ``lr`` at the top stage and the head (``slice(lr/100, lr)``,
fastai's 1e-3), on a one-cycle schedule (warm-up over the first 30% of the steps, then cosine decay), with
label smoothing 0.1. The stages at output stride 4 or finer (stem and first blocks) stay frozen, as in
Detectron2: they are generic, their discriminative rate would be tiny anyway, and skipping their backward
pass makes a training step faster on a CPU.

A schedule of :data:`MIXUP_MIN_EPOCHS` epochs or more trains on mixed batches (:func:`mixes`): each batch is
either MixUp (alpha 0.2) or CutMix (alpha 1.0) of itself, timm's ``Mixup`` with its label smoothing, because
many epochs over a small set overfit; a short schedule keeps plain batches, as mixing slows what little
training it has (fastai: MixUp needs more epochs). The figures behind each choice: BENCHMARKS.md,
"Figures behind the defaults".
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn

from ..backbones.models import Classifier, SimpleCNN
from ..config import TrainConfig
from ..runtime import cpu_has_bf16, keep_freed_memory, training_device
from .callbacks import AnnealByDeadline, AnnealingStop, BestWeights, Deadline, History, MustPay, StageUnfreeze
from .datamodule import FinetuneData
from .module import ClassifierModule
from .trainer import make_trainer

__all__ = ["FinetuneConfig", "FinetuneResult", "fit_finetune", "backbone_stages", "early_stages", "StageUnfreeze",
           "Deadline", "precision_for", "mixes", "param_groups", "batch_mixer", "stochastic_depth", "LR_SPREAD",
           "WARMUP", "MIXUP_MIN_EPOCHS"]

#: Ratio of the top stage's learning rate to the stem's (fastai's ``slice(lr/100, lr)``).
LR_SPREAD = 100.0
#: Share of the fine-tuning steps spent warming the learning rate up (fastai's ``pct_start``).
WARMUP = 0.3
#: Fine-tuning mixes its batches (``mixup`` auto) when its schedule has at least this many epochs ...
MIXUP_MIN_EPOCHS = 5.0
#: ... with MixUp at this Beta(alpha, alpha) or CutMix at this one, each half of the batches (timm's defaults
#: for CutMix and the low end of its MixUp range, as in its fine-tuning recipes).
MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0
#: The exponential moving average of the weights spans this share of the fine-tuning steps.
EMA_SPAN = 0.1


@dataclass
class FinetuneConfig:
    """Fine-tuning options (see the module docstring for why the defaults are what they are).

    epochs: after the frozen phase; a fraction trains on that share of one epoch. lr: the top stage's
    and the head's rate. head_lr: the head's, when it differs (a new, untrained head: the pipeline
    passes 2x). val_every: share of an epoch between validation passes. discard_after_s: with
    ``initial_val_loss``, stop when this many seconds have gone without beating it (:class:`MustPay`).
    """

    epochs: float = TrainConfig.ft_epochs
    lr: float = TrainConfig.ft_lr
    head_lr: float | None = None
    freeze_epochs: int = TrainConfig.freeze_epochs
    unfreeze: str | int = TrainConfig.unfreeze
    frozen_stride: int = TrainConfig.frozen_stride  # pretrained stages at this output stride or finer stay frozen
    weight_decay: float = TrainConfig.weight_decay
    label_smoothing: float = TrainConfig.ft_label_smoothing
    mixup: str = TrainConfig.ft_mixup  # auto|on|off (see mixes)
    val_every: float = 1.0
    ema: bool = True
    discard_after_s: float | None = None
    batch_size: int = TrainConfig.ft_batch_size
    patience: int | None = TrainConfig.ft_patience  # None: no early stopping (a non-finite loss still stops)
    grad_clip: float | None = TrainConfig.grad_clip
    augment: str = "light"
    class_weights: Sequence[float] | None = None
    balance_sampler: bool = False
    seed: int = TrainConfig.seed
    workers: int = 2
    accelerator: str = TrainConfig.accelerator
    devices: int | str = TrainConfig.devices
    strategy: str = TrainConfig.strategy
    num_nodes: int = TrainConfig.num_nodes
    mixed_precision: bool = TrainConfig.mixed_precision
    deadline: float | None = None  # time.time() by which the whole run must be done
    reserve_s: float = 5.0  # time kept after training for evaluation, report and saving
    initial_val_loss: float | None = None  # the starting model's calibrated validation NLL, if known
    multilabel: bool = False  # labels are 0/1 rows; binary cross-entropy, class_weights = positive weights
    train_bn: bool = False  # BatchNorm statistics adapt to the data (train mode) in the stages that train
    cpu_bf16: bool = False  # train in bf16 on a CPU that has it (a plain CNN: 2x; depthwise convolutions: slower)
    drop_path: float = TrainConfig.ft_drop_path  # stochastic depth's rate at the deepest block (stochastic_depth)
    keep_final: bool = False  # a schedule run to its end keeps its final weights, not its best validated ones
    cached: bool = False  # train the top stages on cached activations of the frozen lower ones (training.cached)
    quiet: bool = False


@dataclass
class FinetuneResult:
    """The fine-tuned classifier (best validation epoch) and its history."""

    model: Classifier
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    epochs_run: int = 0
    stopped_by_time: bool = False
    is_global_zero: bool = True
    validations: list[dict[str, Any]] = field(default_factory=list)
    improved: bool = True  # False: no validation beat the starting model, which was kept
    stopped_unpaid: bool = False  # stopped by MustPay
    stopped_early: bool = False  # stopped by early stopping on validation (converged)
    shortened_to: float | None = None  # epochs the schedule was shortened to (its last one partial), to anneal by the deadline
    kept_weights: str = "best"  # "best" validated, or "final" (keep_final and the schedule ran to its end)
    mixup: bool = False  # trained on mixed batches (MixUp or CutMix)
    drop_path: float = 0.0  # stochastic depth's deepest rate in training
    cached: dict[str, Any] | None = None  # a fit on cached activations: what was cached, its speed
    decisions: dict[str, Any] = field(default_factory=dict)  # what the fit decided before training, with figures
    unkept: Classifier | None = None  # the fine-tuned network when it did not beat its start (which was kept)
    unkept_val: dict[str, Any] | None = None  # that network's validation pass (val_acc, val_cal_loss)
    kept_by: str = "loss"  # "loss": beat the start's calibrated loss; "tolerance": decisions.keeps_finetuned

    def to_record(self) -> dict[str, Any]:
        """What fine-tuning did, for ``metrics.json``: every validation pass, whether its result was kept,
        which weights, how it trained and why it stopped."""
        return {**({"cached": self.cached} if self.cached else {}),
                "epochs_run": self.epochs_run, "kept": self.improved,
                **({"kept_by": self.kept_by} if self.improved else {}), "stopped_early": self.stopped_early,
                "stopped_by_time": self.stopped_by_time, "stopped_unpaid": self.stopped_unpaid,
                "shortened_to": self.shortened_to, "weights": self.kept_weights, "mixup": self.mixup,
                "drop_path": self.drop_path, "validations": self.validations}


def backbone_stages(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in stages, stem first (timm's coarse ``group_matcher``)."""
    inner = getattr(model, "model", model)
    if isinstance(inner, SimpleCNN) or not hasattr(inner, "group_matcher"):
        return [[p for p in model.parameters()]]
    from timm.models import group_parameters

    groups = group_parameters(inner, inner.group_matcher(coarse=True))
    named = dict(inner.named_parameters())
    stages = [[named[n] for n in names if n in named] for _, names in sorted(groups.items())]
    return [s for s in stages if s]


def early_stages(model: nn.Module, stages: list[list[nn.Parameter]], size: int, max_stride: int = 4) -> int:
    """How many leading stages compute at ``max_stride`` or finer (a probe forward measures each stage's
    output stride). These are the generic edge and texture layers; they cost the most compute per
    parameter, and Detectron2 keeps them frozen by default (``FREEZE_AT=2``: stem and stride-4 stage).
    Never counts the last stage; 0 when ``max_stride`` is 0."""
    if max_stride <= 0 or len(stages) < 2:
        return 0
    owner = {id(p): i for i, s in enumerate(stages) for p in s}
    finest: dict[int, int] = {}

    def hook(i: int):
        def record(_m, _inp, out) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                finest[i] = min(finest.get(i, out.shape[-1]), out.shape[-1])
        return record

    handles = []
    for m in model.modules():
        own = [owner[id(p)] for p in m.parameters(recurse=False) if id(p) in owner]
        if own:
            handles.append(m.register_forward_hook(hook(own[0])))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    count = 0
    for i in range(len(stages) - 1):
        if i not in finest or size // finest[i] > max_stride:
            break
        count += 1
    return count


def param_groups(model: Classifier, stages: list[list[nn.Parameter]], cfg: FinetuneConfig,
                 pretrained: bool = True) -> list[dict[str, Any]]:
    """Optimiser groups: the head at ``head_lr`` (or ``lr``), then each pretrained stage at a rate spread
    geometrically from ``lr / LR_SPREAD`` at the stem to ``lr`` at the top; from scratch every layer is new
    and trains at the head's rate."""
    groups: list[dict[str, Any]] = [{"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.lr}]
    if not pretrained:
        return groups + [{"params": [p for s in stages for p in s], "lr": cfg.head_lr or cfg.lr}]
    top, bottom, n = cfg.lr, cfg.lr / LR_SPREAD, len(stages)
    for i, stage in enumerate(stages):
        groups.append({"params": stage, "lr": bottom * (top / bottom) ** (i / max(1, n - 1))})
    return groups


def _stage_modules(model: nn.Module, stages: list[list[nn.Parameter]]) -> list[list[nn.Module]]:
    """BatchNorm modules of each stage (a BN belongs to the stage of its weight)."""
    owner = {id(p): i for i, s in enumerate(stages) for p in s}
    out: list[list[nn.Module]] = [[] for _ in stages]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and id(m.weight) in owner:
            out[owner[id(m.weight)]].append(m)
    return out


class _FinetuneModule(ClassifierModule):
    """Skips a batch whose every file failed to decode (Lightning skips a step that returns ``None``)."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        return None if batch[0].numel() == 0 else super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch[0].numel():
            super().validation_step(batch, batch_idx)


def precision_for(accelerator: str, mixed_precision: bool, cpu_bf16: bool = False) -> str:
    """Lightning precision for training: 16-mixed/bf16-mixed on CUDA, 32 on the CPU (bf16-mixed there with
    ``cpu_bf16`` where the CPU has native bf16: a plain CNN such as ``simple_cnn`` trains faster in it).

    bf16 autocast speeds up a CPU's forward pass but not the training step of a network of depthwise
    convolutions, whose backward pass is slow in bf16, so such training stays in fp32 on a CPU
    (``bench/bench_train_step.py``; BENCHMARKS.md, "Figures behind the defaults").
    """
    if not mixed_precision:
        return "32-true"
    if training_device(accelerator) == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_bf16 and cpu_has_bf16() else "32-true"


def mixes(cfg: FinetuneConfig, pretrained: bool = True) -> bool:
    """Whether fine-tuning trains on mixed batches: ``mixup`` on, or auto with a pretrained network, a
    schedule of :data:`MIXUP_MIN_EPOCHS` or more, and one label per image (mixing was not measured for the
    scratch CNN or multi-label training, so they train on plain batches)."""
    if cfg.mixup != "auto":
        return cfg.mixup == "on" and not cfg.multilabel
    return pretrained and not cfg.multilabel and cfg.epochs >= MIXUP_MIN_EPOCHS


@contextmanager
def stochastic_depth(model: nn.Module, rate: float) -> Iterator[int]:
    """Inside the ``with`` block, every residual branch of ``model`` that timm names ``drop_path`` is dropped in
    training with a probability rising linearly from 0 at the first such block to ``rate`` at the last
    (timm's ``drop_path_rate``); afterwards the blocks are as they were. Yields how many blocks drop."""
    from timm.layers import DropPath

    owners = [m for m in model.modules() if isinstance(getattr(m, "drop_path", None), (nn.Identity, DropPath))]
    before = [m.drop_path for m in owners]
    try:
        if rate > 0:
            for i, m in enumerate(owners):
                m.drop_path = DropPath(rate * i / max(1, len(owners) - 1)).train(m.training)
        yield len(owners) if rate > 0 else 0
    finally:
        for m, old in zip(owners, before):
            m.drop_path = old


def batch_mixer(n_classes: int, label_smoothing: float) -> Any:
    """timm's ``Mixup``: per batch MixUp or CutMix (half each), soft targets with ``label_smoothing``."""
    from timm.data import Mixup

    return Mixup(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, switch_prob=0.5,
                 label_smoothing=label_smoothing, num_classes=n_classes)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def fit_finetune(model: Classifier, train_paths: Sequence[str], train_y: Sequence[int], val_paths: Sequence[str],
                 val_y: Sequence[int], cfg: FinetuneConfig, run_dir: str | os.PathLike[str],
                 history: History, resume: bool = False, pretrained: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` end to end; checkpoints every epoch in ``run_dir/checkpoints``.

    With ``resume``, continues from ``checkpoints/last.ckpt`` (a run killed at any point, SIGKILL
    included, loses at most the epoch in progress). A backbone without pretrained weights trains
    from the first epoch at the full rate (no frozen phase).
    """
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stages = backbone_stages(model.backbone)
    bns = _stage_modules(model.backbone, stages)
    freeze_epochs = cfg.freeze_epochs if pretrained else 0
    groups = param_groups(model, stages, cfg, pretrained)
    model = model.to(memory_format=torch.channels_last)
    keep_freed_memory()
    mix = batch_mixer(_n_outputs(model.head), cfg.label_smoothing) if mixes(cfg, pretrained) else None
    module = _FinetuneModule(model, lr=cfg.lr, weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                             class_weights=cfg.class_weights, warmup=WARMUP, param_groups=groups,
                             input_transform=_channels_last, multilabel=cfg.multilabel, mix=mix)
    pre_cfg = model.preprocessing
    data = FinetuneData(pre_cfg, train_paths, train_y, val_paths, val_y, batch_size=cfg.batch_size,
                        augment=cfg.augment, seed=cfg.seed, workers=cfg.workers,
                        balance_sampler=cfg.balance_sampler and not cfg.multilabel)
    # Label smoothing leaves a fine-tuned model uniformly under-confident, which raw validation NLL
    # punishes though temperature scaling will undo it; select on the NLL after that scaling.
    monitor = "val_cal_loss" if data.has_val else "train_loss"
    ema = None
    always_frozen = early_stages(model.backbone, stages, pre_cfg.size, cfg.frozen_stride) if pretrained else 0
    unfreeze = StageUnfreeze(stages, bns, freeze_epochs, cfg.unfreeze if pretrained else "all",
                             train_bn=not pretrained or cfg.train_bn,
                             always_frozen=always_frozen)
    # one file, checkpoints/last.ckpt, rewritten every epoch: it holds the last weights and (in
    # BestWeights' state) the best ones; no version counter, so --resume reads what this run wrote
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="epoch{epoch:03d}", save_last=True,
                           every_n_epochs=1, save_top_k=0, auto_insert_metric_name=False,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    world = (cfg.devices if isinstance(cfg.devices, int) else 1) * cfg.num_nodes  # DDP splits each epoch
    batches = max(1, math.ceil(data.train_batches() / world))
    # validation every val_steps batches within each epoch (and at its end); the run ends on one
    val_steps = max(1, min(batches, int(cfg.val_every * batches)))
    whole, part = divmod(cfg.epochs, 1.0)
    steps = (freeze_epochs + int(whole)) * batches + math.ceil(part * batches / val_steps) * val_steps
    steps = max(steps, freeze_epochs * batches + val_steps)
    if cfg.ema and pretrained:
        # Validation and the saved model use an exponential moving average of the weights: at the peak of
        # the one-cycle schedule single iterates are noisy, and the average starts from the trained head.
        ema = EMAWeightAveraging(decay=1.0 - 1.0 / max(5.0, EMA_SPAN * (steps - freeze_epochs * batches)),
                                 update_starting_at_step=freeze_epochs * batches)
    best = BestWeights(monitor, averaging=ema, keep_final=cfg.keep_final)
    callbacks: list[Any] = [unfreeze, history, *([ema] if ema else []), best, ckpt]
    early = None
    if data.has_val:
        # patience counts from the rate's peak: while it warms up a rising loss is the schedule's own doing
        early = AnnealingStop(monitor, patience=None if cfg.patience is None else
                              max(1, math.ceil(cfg.patience * batches / val_steps)))
        callbacks.append(early)
    deadline = Deadline(cfg.deadline, margin_s=cfg.reserve_s) if cfg.deadline else None
    must_pay = None
    if cfg.initial_val_loss is not None:  # fine-tuning must beat where it starts (the trained head)
        best.best, best.best_epoch = float(cfg.initial_val_loss), -1
        best.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if cfg.discard_after_s is not None and data.has_val:
            must_pay = MustPay(best, cfg.discard_after_s)
            callbacks.append(must_pay)
    fitted = AnnealByDeadline(deadline) if deadline is not None else None
    if deadline is not None:
        callbacks += [deadline, fitted]
    # max_steps only for a share of an epoch: Lightning resumes a run cut at an epoch's end cleanly only
    # when max_epochs alone ends it
    trainer = make_trainer(run_dir / "logs", max_epochs=math.ceil(steps / batches),
                           max_steps=steps if steps % batches else -1,
                           callbacks=callbacks, quiet=cfg.quiet, version="finetune", accelerator=cfg.accelerator,
                           devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
                           precision=precision_for(cfg.accelerator, cfg.mixed_precision, cfg.cpu_bf16),
                           gradient_clip_val=cfg.grad_clip, checkpoint=True, deterministic=False,
                           val_check_interval=val_steps / batches if val_steps < batches else None)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        _allow_checkpoint_globals()
    module.train()
    with stochastic_depth(model.backbone, cfg.drop_path):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    unkept = None
    if best.unkept is not None:  # the fine-tuned network that lost to its start, scored on the test images too
        unkept = copy.deepcopy(module)
        unkept.load_state_dict(best.unkept)
        unkept = unkept.model.eval()
    model = module.model.eval()
    return FinetuneResult(model, history.rows, best.best_epoch + 1, trainer.current_epoch,
                          bool(deadline and deadline.triggered), trainer.is_global_zero,
                          validations=best.validations, improved=best.improved,
                          stopped_unpaid=bool(must_pay and must_pay.triggered),
                          stopped_early=bool(early is not None and early.stopped),
                          shortened_to=fitted.shortened_to if fitted is not None else None,
                          kept_weights=best.kept, mixup=mix is not None, drop_path=cfg.drop_path, unkept=unkept,
                          unkept_val=best.validations[-1] if unkept is not None and best.validations else None)


def _n_outputs(head: nn.Module) -> int:
    """The number of classes a head scores: its last linear layer's outputs."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features


def _allow_checkpoint_globals() -> None:
    """Our own checkpoints hold only tensors, numbers and lists; torch's weights_only loader needs the
    few plain types Lightning stores to be allow-listed."""
    try:
        import collections

        torch.serialization.add_safe_globals([collections.OrderedDict, collections.defaultdict, dict, list])
    except Exception:
        pass
