"""What a run decides before it trains: head or not, fine-tuning or not, which recipes race, and what trains
when the budget leaves no fine-tuning.

Pure functions of the data's description, the options and the plan's verdict: no torch, no files, so each
rule is unit-tested in microseconds. The pipeline does what a :class:`Decision` says and records its
reasons in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .training.recipes import Recipe, get_recipe

__all__ = ["Decision", "decide", "portfolio", "skips_head", "fallback", "whole_network", "keeps_finetuned",
           "LOSS_TOLERANCE", "SCRATCH_MAX_SIDE", "SCRATCH_MIN_IMAGES"]

#: A fine-tuning that did not beat the head's calibrated validation loss is still kept when it is at least as
#: accurate on validation and its calibrated loss is within this share of the head's (:func:`keeps_finetuned`).
LOSS_TOLERANCE = 0.05
#: The scratch CNN is a candidate for images at most this many pixels on their shorter side ...
SCRATCH_MAX_SIDE = 64
#: ... and at least this many training images.
SCRATCH_MIN_IMAGES = 10_000


@dataclass(frozen=True)
class Decision:
    """What the run does. head: train the frozen-feature head first. finetune: fine-tune after it (the
    plan may still find no time for it). candidates: the recipes to race (empty: the single recipe, no
    race). notes: what the user is warned of. reasons: lines for the plan."""

    head: bool
    finetune: bool
    candidates: tuple[Recipe, ...] = ()
    notes: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    chosen: bool = False  # the candidates are the portfolio's choice, not the user's --candidates

    @property
    def cached(self) -> bool:
        """Every candidate fine-tunes on cached activations, so the plan counts that path's costs."""
        return bool(self.candidates) and all(c.options.get("cached") for c in self.candidates)


def portfolio(native: int | None, n_train: int, pretrained: bool, names: Sequence[str] = (),
              budgeted: bool = False) -> list[Recipe]:
    """The recipes to race: ``names`` if given, else chosen from the images' shorter side ``native``, the
    number of training images, whether the backbone is pretrained and whether a time limit bounds the run
    (``budgeted``): after the head, ``top`` (the top stages on cached activations, the most epochs per
    CPU-minute) under a time limit and ``recipe`` (the whole network to convergence) without one; for
    small images in large numbers ``transfer`` against ``scratch`` (extracting them all at an ImageNet
    resolution would cost a large share of the budget); ``transfer`` alone from random weights."""
    if not names:
        if not pretrained:
            names = ("transfer",)  # the user's own backbone from random weights: nothing to race it against
        elif native is not None and native <= SCRATCH_MAX_SIDE and n_train >= SCRATCH_MIN_IMAGES:
            names = ("transfer", "scratch")
        else:
            names = ("top",) if budgeted else ("recipe",)
    return [get_recipe(n) for n in dict.fromkeys(names)]


def skips_head(candidates: Sequence[Recipe]) -> bool:
    """True when no candidate starts from the frozen-feature head, so the head phase is not run."""
    return not any(c.from_head for c in candidates)


def decide(*, mode: str, recipe: str, candidates: Sequence[str], pretrained: bool, task: str, distributed: bool,
           native: int | None, n_train: int, budgeted: bool = False) -> Decision:
    """The run's first decision, from its options (``mode``, ``recipe``, ``candidates``), the backbone
    (``pretrained``), the task, whether several processes share the run, and the data (the images'
    shorter side ``native``, ``n_train`` training images).

    Example:
        >>> decide(mode="auto", recipe="race", candidates=(), pretrained=True, task="single",
        ...        distributed=False, native=300, n_train=500).candidates[0].name
        'recipe'
    """
    head = mode in ("head", "knn") or (mode == "auto" and pretrained)
    finetune = mode in ("finetune", "auto")
    if recipe != "race" or not finetune:
        return Decision(head, finetune)
    if task == "multilabel":
        return Decision(head, finetune, reasons=("multi-label: the single recipe trains (the race ranks recipes by "
                                                 "accuracy)",))
    if distributed:
        return Decision(head, finetune, notes=("--recipe race runs in one process: a distributed run trains the "
                                               "single recipe.",))
    raced = tuple(portfolio(native, n_train, pretrained, candidates, budgeted))
    if head and skips_head(raced):
        why = f"no frozen-feature head: the race is {' against '.join(c.name for c in raced)} (small images in " \
              "large numbers)"
        return Decision(False, finetune, raced, reasons=(why,))
    return Decision(head, finetune, raced, chosen=not candidates)


def whole_network(decision: Decision, whole: bool) -> Decision:
    """The portfolio's ``top`` becomes ``recipe`` where the plan found that the whole network fits as many
    epochs as the top stages were planned for (``whole``); the user's own ``--candidates`` stay as named."""
    if not (whole and decision.chosen and decision.cached):
        return decision
    return replace(decision, candidates=(get_recipe("recipe"),))


def fallback(decision: Decision, plan_finetune: bool, pretrained: bool) -> tuple[Decision, float, str | None]:
    """What trains once the plan is made before fine-tuning: when it leaves no fine-tuning and no head was
    trained, the cheapest thing that can (a run never ends with an untrained network): the scratch CNN alone
    when the race has it (its epochs come from its own, far lower, measured cost), else the frozen-feature
    head of a pretrained backbone, else the share of an epoch the deadline allows.

    Returns the decision (``finetune`` as the plan says, or as the fallback changes it), the least epochs
    the plan must hold (0: as planned) and the reason for the plan (``None``: nothing changed)."""
    if plan_finetune or decision.head:
        return replace(decision, finetune=decision.finetune and plan_finetune), 0.0, None
    scratch = tuple(c for c in decision.candidates if c.name == "scratch")
    if scratch:
        why = "the pretrained network does not fit in the budget: the scratch CNN alone trains, at its own cost"
        return replace(decision, finetune=True, candidates=scratch), 1.0, why
    if pretrained:
        return replace(decision, head=True, finetune=False, candidates=()), 0.0, \
            "the frozen-feature head is trained instead"
    why = "half an epoch, which the deadline may cut: an untrained network is no result"
    return replace(decision, finetune=True), 0.5, why


def keeps_finetuned(head_acc: float, head_loss: float, ft_acc: float, ft_loss: float) -> bool:
    """Head or fine-tuned network, once the fine-tuned one has failed to beat the head's calibrated validation
    loss: a split of a few hundred images cannot separate close figures, so the fine-tuned network (adapted to
    the data end to end) is kept when it is at least as accurate and its calibrated loss is within
    :data:`LOSS_TOLERANCE` of the head's; the head stays when it is more accurate or clearly better calibrated.

    Example:
        >>> keeps_finetuned(0.848, 0.370, 0.855, 0.385), keeps_finetuned(0.848, 0.370, 0.845, 0.371)
        (True, False)
    """
    return round(ft_acc, 4) >= round(head_acc, 4) and ft_loss <= head_loss * (1 + LOSS_TOLERANCE)
