"""Training: heads on cached features, fine-tuning on Lightning, callbacks."""

from .callbacks import HISTORY_FIELDS, BestWeights, History
from .head import HeadConfig, HeadResult, balanced_class_weights, fit_head
from .module import ClassifierModule, cosine_with_warmup
from .trainer import make_trainer, quiet_lightning

__all__ = ["HISTORY_FIELDS", "BestWeights", "History", "HeadConfig", "HeadResult",
           "balanced_class_weights", "fit_head", "ClassifierModule", "cosine_with_warmup",
           "make_trainer", "quiet_lightning"]
