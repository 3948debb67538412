"""The kind of labels a run learns: one class per image, or any number of labels (``--task multilabel``).

A :class:`Task` holds everything that differs between the two: the targets, the head on cached
features, the activation, the validation loss, the class weights, a split's result and the run's
outputs. The pipeline runs the same stages for both and asks the task at each of these points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from torch import nn

from .backbones.models import build_head

from .errors import ConfigError, DataError
from .evaluation.multilabel import MultiLabelResult
from .evaluation.outputs import SplitResult
from .finish import finish_single_label
from .multilabel import finish_multilabel
from .probability import calibrated_nll, multilabel_nll, sigmoid, softmax
from .training.head import HeadConfig, HeadResult, balanced_class_weights, fit_head, fit_probe
from .training.multilabel import fit_multilabel_probe, label_matrix, pos_weights
from .training.prototypes import fit_prototypes

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data.scan import Sample
    from .training.callbacks import History

__all__ = ["Task", "SingleLabel", "MultiLabel", "task_for"]


class Task:
    """What a kind of labels needs of the run. ``name``: ``single`` or ``multilabel``; ``multilabel``: the
    fine-tuning's loss is binary cross-entropy on rows of 0/1."""

    name = "single"
    multilabel = False
    #: the label-issue search, learning curve and open-set scorer apply (they read one label per image)
    diagnoses = True
    activate: Callable[[np.ndarray], np.ndarray] = staticmethod(softmax)

    def check(self, cfg: TrainConfig) -> None:
        """Refuse options that have no meaning for this task (a :class:`ConfigError`)."""

    def new_head(self, n_features: int, n_classes: int, cfg: TrainConfig) -> nn.Module:
        """An untrained head of the run's shape (fine-tuning's start when no head stage runs)."""
        return build_head(n_features, n_classes, tuple(cfg.head), cfg.dropout)

    def targets(self, samples: Sequence[Sample], classes: list[str]) -> np.ndarray:
        """The samples' labels as the training targets: class indices."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[s.label] for s in samples], dtype=np.int64)

    def check_train(self, y: np.ndarray, classes: list[str]) -> None:
        """Every class has a usable training image (else a :class:`DataError` naming those that do not)."""
        missing = sorted(set(range(len(classes))) - set(y.tolist()))
        if missing:
            raise DataError(f"class(es) {', '.join(repr(classes[i]) for i in missing)} have no usable training image.")

    def fit_head(self, xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, n_classes: int,
                 cfg: TrainConfig, log_dir: Any, history: History) -> tuple[HeadResult, dict[str, Any]]:
        """The head on cached features and its description for the artifact (``kind`` and its parameters)."""
        weights = self.loss_weights(ytr, n_classes) if cfg.loss_weights else None
        head_cfg = HeadConfig(hidden=tuple(cfg.head), dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, patience=cfg.patience,
                              label_smoothing=cfg.label_smoothing, class_weights=weights,
                              balance_sampler=cfg.balance == "sampler", seed=cfg.seed, quiet=cfg.quiet)
        if cfg.mode == "knn":
            if cfg.head:
                raise ConfigError("--mode knn is a nearest-prototype model: it takes no --head widths.")
            proto, scale = fit_prototypes(xtr, ytr, xva, yva, n_classes)
            return HeadResult(proto), {"kind": "prototypes", "scale": scale, "normalize": True}
        if cfg.head:
            return fit_head(xtr, ytr, xva, yva, n_classes, head_cfg, log_dir=log_dir, history=history), {"kind": "mlp"}
        return fit_probe(xtr, ytr, xva, yva, n_classes, head_cfg, history=history), {"kind": "linear"}

    def val_loss(self, probs: np.ndarray, y: np.ndarray) -> float:
        """The validation loss fine-tuning must beat: the NLL after temperature scaling."""
        return calibrated_nll(probs, y)

    def loss_weights(self, y: np.ndarray, n_classes: int) -> list[float]:
        """Loss weights against imbalance (``--balance weights``): inverse class frequency."""
        return balanced_class_weights(y, n_classes)

    def result(self, y: np.ndarray, probs: np.ndarray, paths: Sequence[str]) -> Any:
        """One split's labels, probabilities and files, as the outputs read them."""
        return SplitResult(y, probs, paths)

    def fit_targets(self, y: np.ndarray) -> list[Any]:
        """The targets as fine-tuning's data module takes them."""
        return y.tolist()

    #: writes the run's outputs and artifact
    finish = staticmethod(finish_single_label)


class SingleLabel(Task):
    """One class per image: softmax outputs, a probe or MLP head, temperature scaling."""


class MultiLabel(Task):
    """Any number of labels per image: sigmoid outputs, binary cross-entropy, a threshold per label."""

    name = "multilabel"
    multilabel = True
    diagnoses = False
    activate = staticmethod(sigmoid)

    def check(self, cfg: TrainConfig) -> None:
        refused = {"mode knn": cfg.mode == "knn", "--head widths (an MLP)": bool(cfg.head),
                   "--aug-views": cfg.aug_views > 0, "--balance sampler": cfg.balance == "sampler",
                   "--candidates": bool(cfg.candidates)}
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: not available for a multi-label task; a multi-label model has a "
                              "linear sigmoid head, --balance weights weighs each label's positives by its "
                              "rarity, and the single fine-tuning recipe trains (the race ranks recipes by "
                              "single-label accuracy).")

    def new_head(self, n_features: int, n_classes: int, cfg: TrainConfig) -> nn.Module:
        return build_head(n_features, n_classes)

    def targets(self, samples: Sequence[Sample], classes: list[str]) -> np.ndarray:
        return label_matrix([s.labels for s in samples], classes)

    def check_train(self, y: np.ndarray, classes: list[str]) -> None:
        """Nothing to check: a label without a positive training image scores low, as it should."""

    def fit_head(self, xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, n_classes: int,
                 cfg: TrainConfig, log_dir: Any, history: History) -> tuple[HeadResult, dict[str, Any]]:
        fit = fit_multilabel_probe(xtr, ytr, xva, yva, history=history,
                                   pos_weight=pos_weights(ytr) if cfg.loss_weights else None)
        return fit, {"kind": "linear"}

    def val_loss(self, probs: np.ndarray, y: np.ndarray) -> float:
        return multilabel_nll(probs, y)

    def loss_weights(self, y: np.ndarray, n_classes: int) -> list[float]:
        """Each label's positives weighted by their rarity."""
        return pos_weights(y).tolist()

    def result(self, y: np.ndarray, probs: np.ndarray, paths: Sequence[str]) -> Any:
        return MultiLabelResult(y, probs, paths)

    def fit_targets(self, y: np.ndarray) -> list[Any]:
        return y.astype(np.int64).tolist()

    finish = staticmethod(finish_multilabel)


def task_for(name: str) -> Task:
    """The task of a scanned dataset (``Dataset.task``: ``single`` or ``multilabel``)."""
    return MultiLabel() if name == "multilabel" else SingleLabel()
