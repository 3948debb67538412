"""The options of a training run: :class:`TrainConfig`, the one place where each default is written.

The CLI's ``train`` options take their defaults from here, and so do the head's and the fine-tuning's
own configs (:class:`~transferlab.training.head.HeadConfig`, :class:`~transferlab.training.finetune.
FinetuneConfig`) and the split. ``--config FILE`` (TOML or JSON, or a run's ``train_config.json``) sets
any of them by field name; flags given on the command line win over the file. Standard library only,
so that reading the defaults costs nothing at start-up.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["TrainConfig", "DEFAULT_BACKBONE", "MODES", "BALANCE", "RECIPE_CHOICES", "read_config_file",
           "config_from_dict", "duration_seconds"]

#: The backbone every command uses unless told otherwise (weights bundled offline).
DEFAULT_BACKBONE = "efficientnet_lite0"
MODES = ("head", "finetune", "auto", "knn")
BALANCE = ("none", "weights", "sampler")
RECIPE_CHOICES = ("race", "single")
MIXUP_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Every option of ``transferlab train`` with its default (the README says why).

    backbone: alias or timm name (default ``efficientnet_lite0``, weights bundled offline).
    mode: ``head`` trains a head on cached frozen features; ``knn`` takes the nearest class prototype
        (mean feature) with no training, as a linear head; ``finetune`` trains the network end to end
        (backbone frozen for ``freeze_epochs``, then ``unfreeze`` stages with discriminative rates;
        the stages at output stride ``frozen_stride`` or finer never train, 0 trains them too);
        ``auto`` (default) does ``head`` first, then fine-tunes starting from that head.
    head / dropout: MLP widths (empty: linear) and dropout. epochs / lr / batch_size / patience: the head
        phase (extraction picks its own batch size, see :class:`FeatureExtractor`).
    ft_epochs / ft_lr / ft_patience / ft_batch_size: the fine-tuning phase.
    ft_mixup: ``auto|on|off``: MixUp and CutMix in fine-tuning (``auto``: a pretrained network's schedule of
        5 epochs or more, single-label; see :func:`transferlab.training.finetune.mixes`).
    ft_drop_path: stochastic depth's rate at the deepest residual block in fine-tuning (default 0: it did not
        pay in a 15-minute schedule; BENCHMARKS.md, "Figures behind the defaults").
    augment: ``auto|none|light|strong|orient`` for fine-tuning (``auto``: ``light``, or ``orient`` where the
        data has no up, judged by :mod:`transferlab.orientation`); aug_views: augmented views cached per image (head).
    balance: ``none|weights|sampler`` against class imbalance (the loss weighted by inverse class
        frequency, or a sampler that draws the classes evenly).
    time_limit: seconds for the whole run; training stops in time to evaluate and save.
    diagnose: after the head phase, search the training split for label issues and compute the learning
        curve on the cached features (``label_issues.csv``/``.html``, report sections); up to 5,000 images.
    task: ``auto`` (from the data: a manifest headed ``labels`` or with ``;``-separated labels is multi-label),
        ``single`` or ``multilabel`` (sigmoid outputs, binary cross-entropy, per-label thresholds; class
        folders then may hold the same image under several labels).
    devices / strategy / num_nodes / accelerator: Lightning's, for fine-tuning (``ddp`` over several).
    engine: what runs the frozen backbone's forward passes: ``auto`` (the faster of PyTorch and ONNX Runtime
        on this CPU, measured once), ``torch`` or ``onnxruntime``; training itself runs on PyTorch.
    """

    backbone: str = DEFAULT_BACKBONE
    mode: str = "auto"
    pretrained: bool = True
    weights: str | None = None
    allow_download: bool | None = None
    cut_stage: int | None = None
    image_size: int | None = None
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    label_smoothing: float = 0.0
    balance: str = "none"
    aug_views: int = 0
    ft_epochs: int = 8
    ft_lr: float = 1e-3
    ft_batch_size: int = 32
    ft_patience: int = 3
    ft_label_smoothing: float = 0.1
    ft_mixup: str = "auto"
    ft_drop_path: float = 0.0
    freeze_epochs: int = 1
    unfreeze: str = "all"
    frozen_stride: int = 4
    augment: str = "auto"
    grad_clip: float | None = 1.0
    time_limit: float | None = None
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    seed: int = 0
    val: float = 0.15
    test: float = 0.15
    cache_dir: str | None = None
    no_cache: bool = False
    workers: int | None = None
    device: str | None = None
    mixed_precision: bool = True
    engine: str = "auto"
    quiet: bool = False
    top_k: tuple[int, ...] = (1, 3, 5)
    dedupe: bool = False
    diagnose: bool = True
    task: str = "auto"
    recipe: str = "race"
    candidates: tuple[str, ...] = ()

    def validate(self) -> "TrainConfig":
        """Check values; raises :class:`ConfigError` quoting the bad value."""
        from .data.scan import TASKS
        from .data.transforms import AUGMENT_PRESETS
        from .engines import engine_name
        from .training.recipes import recipe_names

        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: expected one of {', '.join(TASKS)}.")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}.")
        if self.recipe not in RECIPE_CHOICES:
            raise ConfigError(f"recipe {self.recipe!r}: expected one of {', '.join(RECIPE_CHOICES)}.")
        unknown = sorted(set(self.candidates) - set(recipe_names()))
        if unknown:
            raise ConfigError(f"candidates {', '.join(map(repr, unknown))}: expected some of "
                              f"{', '.join(recipe_names())} (the registered recipes).")
        self.engine = engine_name(self.engine)
        if self.balance not in BALANCE:
            raise ConfigError(f"balance {self.balance!r}: expected one of {', '.join(BALANCE)}.")
        if self.ft_mixup not in MIXUP_CHOICES:
            raise ConfigError(f"mixup {self.ft_mixup!r}: expected one of {', '.join(MIXUP_CHOICES)}.")
        if not 0.0 <= self.ft_drop_path < 1.0:
            raise ConfigError(f"drop_path {self.ft_drop_path}: expected a probability in [0, 1).")
        if self.augment not in ("auto", *AUGMENT_PRESETS):
            raise ConfigError(f"augment {self.augment!r}: expected one of auto, {', '.join(AUGMENT_PRESETS)}.")
        if self.frozen_stride < 0:
            raise ConfigError(f"frozen_stride {self.frozen_stride}: expected 0 (train every stage) or a stride.")
        if self.unfreeze != "all" and not str(self.unfreeze).isdigit():
            raise ConfigError(f"unfreeze {self.unfreeze!r}: expected 'all' or a number of stages.")
        for name in ("epochs", "batch_size", "ft_epochs", "ft_batch_size", "devices", "num_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1.")
        if self.aug_views < 0:
            raise ConfigError(f"aug_views={self.aug_views}: must be 0 or more.")
        if not (self.lr > 0 and self.ft_lr > 0):
            raise ConfigError(f"learning rates must be positive (got lr={self.lr}, ft_lr={self.ft_lr}).")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1).")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"time_limit={self.time_limit}: must be positive seconds (e.g. 900 for 15m).")
        return self

    def ignored(self) -> list[str]:
        """Options set to something this run will not use, each with why (the run warns, it does not stop)."""
        out = []
        if self.aug_views and self.augment == "none":
            out.append(f"--aug-views {self.aug_views} with --augment none: the cached views use the light augmentation.")
        if self.freeze_epochs != 1 and self.mode in ("auto", "head", "knn"):
            out.append(f"--freeze-epochs {self.freeze_epochs} is for --mode finetune: in mode {self.mode} the head "
                       "is trained first, so fine-tuning starts unfrozen.")
        if self.candidates and self.recipe == "single":
            out.append("--candidates are raced only with --recipe race: --recipe single trains the one recipe.")
        if self.aug_views and self.mode == "finetune":
            out.append("--aug-views is for the head on cached features: --mode finetune augments on the fly.")
        return out

    @property
    def loss_weights(self) -> bool:
        """True when the loss is reweighted by inverse class frequency."""
        return self.balance == "weights"


def config_from_dict(values: dict[str, Any], source: str, strict: bool = True) -> dict[str, Any]:
    """``values`` keyed by :class:`TrainConfig` field names, lists made tuples. ``strict``: a key that is not
    a field is a :class:`ConfigError` naming ``source`` (a run's saved config is read leniently, so that a
    run saved by an older transferlab still resumes)."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown and strict:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(map(repr, unknown))}; expected TrainConfig "
                          f"field names such as {', '.join(sorted(names)[:6])}, ...")
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
    if isinstance(out.get("time_limit"), str):
        out["time_limit"] = duration_seconds(out["time_limit"])
    return out


def duration_seconds(text: str) -> float:
    """'15m', '90s', '1h30m', '2h' or plain seconds -> seconds; :class:`ConfigError` otherwise."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t.replace(" ", ""):
        raise ConfigError(f"expected a duration such as 15m, 90s or 1h30m, got {text!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options in a ``.toml`` or ``.json`` file (a run's ``train_config.json`` too: its ``config``
    entry), checked against :class:`TrainConfig`'s fields.

    Example (``options.toml``)::

        mode = "head"
        time_limit = 300
        head = [512]
    """
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".toml", ".json"):
        raise ConfigError(f"--config '{path}': expected a .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
        if kind == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # the same parser, as a package before Python 3.11
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and json's errors are ValueErrors
        raise ConfigError(f"--config '{path}': cannot read it: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config '{path}': expected a table of options, got {type(values).__name__}.")
    saved_run = isinstance(values.get("config"), dict) and "data" in values
    if saved_run:  # a run's train_config.json; one saved by an older transferlab may name retired options
        values = values["config"]
    return config_from_dict(values, f"--config '{path}'", strict=not saved_run)
