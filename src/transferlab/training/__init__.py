"""Training: heads on cached features, fine-tuning on Lightning, callbacks, and the registry of recipes.

Importing the package is cheap (the recipe registry is read at the CLI's start); the names below load
torch and Lightning on first use.
"""

from importlib import import_module as _import_module

_LAZY = {"HISTORY_FIELDS": "callbacks", "BestWeights": "callbacks", "History": "callbacks", "HeadConfig": "head",
         "HeadResult": "head", "balanced_class_weights": "head", "fit_head": "head",
         "ClassifierModule": "module", "cosine_with_warmup": "module", "make_trainer": "trainer",
         "quiet_lightning": "trainer"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
