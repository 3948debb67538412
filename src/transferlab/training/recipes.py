"""The registry of fine-tuning recipes: what the race may try, each one entry (as timm registers models).

A :class:`Recipe` is data: a name, one line for people, whether it starts from the trained frozen-feature
head, the fine-tuning options it changes (:class:`~transferlab.training.finetune.FinetuneConfig` fields)
and, for a network of its own, the backbone it trains from scratch at the images' own size. The
portfolio, the race, ``--candidates`` and its validation read this registry; adding a recipe is one
:func:`register_recipe` call. Standard library only: the CLI reads it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Recipe", "register_recipe", "get_recipe", "recipe_names", "RECIPES"]


@dataclass(frozen=True)
class Recipe:
    """One way to fine-tune.

    name: the id used by ``--candidates`` and in the run's record. description: one line for people.
    from_head: starts from the trained frozen-feature head (else from a new head, which trains at twice
    the rate from the first step). options: the fine-tuning options it changes, by
    ``FinetuneConfig`` field name. backbone: a network of its own, trained from scratch at the images'
    own resolution (``None``: the run's pretrained backbone).

    Example:
        >>> register_recipe(Recipe("low-lr", "the recipe at a tenth of the rate", options={"lr": 1e-4}))
        ... # doctest: +SKIP
    """

    name: str
    description: str
    from_head: bool = True
    options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    backbone: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


#: Every recipe by name, in the order they were registered.
RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add ``recipe`` to the registry (``replace``: overwrite one of the same name); returns it."""
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered; pass replace=True to change it.")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; registered: {', '.join(RECIPES)}") from None


def recipe_names() -> tuple[str, ...]:
    """The registered recipes' names, in registration order."""
    return tuple(RECIPES)


#: The scratch CNN's learning rate (AdamW, one-cycle peak) and batch size.
SCRATCH_LR = 3e-3
SCRATCH_BATCH = 128

register_recipe(Recipe("recipe", "fine-tune from the head: discriminative rates, EMA, BatchNorm statistics frozen"))
register_recipe(Recipe("bn-adapt", "fine-tune from the head with BatchNorm statistics adapted to the data",
                       options={"train_bn": True}))
register_recipe(Recipe("orient", "fine-tune from the head with flips on both axes and quarter turns",
                       options={"augment": "orient"}))
register_recipe(Recipe("top", "fine-tune the top stages and the head on cached activations of the frozen lower "
                       "stages: many epochs per CPU-minute, BatchNorm policy raced", options={"cached": True}))
register_recipe(Recipe("transfer", "fine-tune the pretrained network from a new head", from_head=False))
register_recipe(Recipe("scratch", "a compact CNN (simple_cnn) from scratch at the images' own resolution",
                       from_head=False, backbone="simple_cnn",
                       options={"lr": SCRATCH_LR, "head_lr": SCRATCH_LR, "batch_size": SCRATCH_BATCH,
                                "augment": "light", "cpu_bf16": True}))
