"""What a run decides, as pure functions of its options and its data's description (no network built)."""

from __future__ import annotations

from transferlab.decisions import Decision, decide, fallback, whole_network


def _decide(**kw) -> Decision:
    args = dict(mode="auto", recipe="race", candidates=(), pretrained=True, task="single", distributed=False,
                native=300, n_train=500)
    return decide(**{**args, **kw})


def _names(d: Decision) -> list[str]:
    return [c.name for c in d.candidates]


def test_the_default_is_the_head_then_a_race_of_one():
    d = _decide()
    assert (d.head, d.finetune, _names(d), d.notes) == (True, True, ["recipe"], ())


def test_under_a_time_limit_the_top_stages_train_on_cached_activations():
    d = _decide(budgeted=True)
    assert (d.head, _names(d), d.cached) == (True, ["top"], True)
    assert not _decide().cached  # without a limit the whole network trains to convergence
    assert _names(_decide(native=28, n_train=54_000, budgeted=True)) == ["transfer", "scratch"]
    assert not _decide(candidates=("top", "recipe"), budgeted=True).cached  # the plan counts both paths' costs


def test_the_whole_network_replaces_top_where_the_plan_found_it_fits():
    d = _decide(budgeted=True)
    assert _names(whole_network(d, whole=True)) == ["recipe"] and not whole_network(d, whole=True).cached
    assert _names(whole_network(d, whole=False)) == ["top"]
    named = _decide(candidates=("top",), budgeted=True)  # the user's own choice stays
    assert _names(whole_network(named, whole=True)) == ["top"]
    race = _decide(native=28, n_train=54_000, budgeted=True)  # not a fit on cached activations: untouched
    assert _names(whole_network(race, whole=True)) == ["transfer", "scratch"]


def test_modes_decide_head_and_fine_tuning():
    assert (_decide(mode="head").head, _decide(mode="head").finetune) == (True, False)
    assert (_decide(mode="knn").head, _decide(mode="knn").finetune, _names(_decide(mode="knn"))) == (True, False, [])
    ft = _decide(mode="finetune")
    assert (ft.head, ft.finetune, _names(ft)) == (False, True, ["recipe"])
    scratch_weights = _decide(pretrained=False)
    assert (scratch_weights.head, _names(scratch_weights)) == (False, ["transfer"])


def test_many_small_images_race_transfer_against_scratch_without_a_head():
    d = _decide(native=28, n_train=54_000)
    assert (d.head, _names(d)) == (False, ["transfer", "scratch"])
    assert any("no frozen-feature head" in r for r in d.reasons)
    assert _names(_decide(native=28, n_train=1_000)) == ["recipe"]


def test_single_recipe_distributed_and_multilabel_runs_do_not_race():
    assert _names(_decide(recipe="single")) == []
    dist = _decide(distributed=True)
    assert _names(dist) == [] and "distributed run trains the single recipe" in dist.notes[0]
    multi = _decide(task="multilabel")
    assert _names(multi) == [] and multi.head and "multi-label" in multi.reasons[0]
    assert _names(_decide(candidates=("orient", "bn-adapt"))) == ["orient", "bn-adapt"]


def test_the_fallback_when_the_budget_fits_no_fine_tuning():
    raced = _decide(native=28, n_train=54_000)
    d, least, why = fallback(raced, plan_finetune=False, pretrained=True)
    assert (d.finetune, _names(d), least) == (True, ["scratch"], 1.0) and "scratch CNN alone" in why
    transfer_only = _decide(native=28, n_train=54_000, candidates=("transfer",))
    d, least, why = fallback(transfer_only, plan_finetune=False, pretrained=True)
    assert (d.head, d.finetune, _names(d)) == (True, False, []) and "head is trained instead" in why
    d, least, why = fallback(_decide(pretrained=False), plan_finetune=False, pretrained=False)
    assert (d.finetune, least) == (True, 0.5) and "half an epoch" in why
    # a head was trained: no fine-tuning is a result; a plan with fine-tuning changes nothing
    assert fallback(_decide(), plan_finetune=False, pretrained=True) == (
        Decision(True, False, _decide().candidates, chosen=True), 0.0, None)
    assert fallback(raced, plan_finetune=True, pretrained=True) == (raced, 0.0, None)


def test_a_fine_tuning_that_ties_the_head_is_kept_within_the_stated_tolerance():
    from transferlab.decisions import LOSS_TOLERANCE, keeps_finetuned

    # the figures: 0.855 against the head's 0.848 on 296 images, a calibrated loss a little higher
    assert keeps_finetuned(0.848, 0.370, 0.855, 0.370 * (1 + LOSS_TOLERANCE) - 1e-9)
    assert not keeps_finetuned(0.848, 0.370, 0.855, 0.370 * (1 + LOSS_TOLERANCE) + 1e-6)  # clearly worse loss
    assert not keeps_finetuned(0.848, 0.370, 0.8446, 0.360)  # less accurate: the head stays
    assert keeps_finetuned(0.85, 0.370, 0.8500001, 0.371)  # equal accuracy (float32 from torch) is a tie


def test_the_stage_swaps_in_the_fine_tuned_network_only_within_the_tolerance():
    from types import SimpleNamespace

    import numpy as np

    from transferlab.distributed import World
    from transferlab.stages import _within_tolerance
    from transferlab.training.finetune import FinetuneResult

    start = SimpleNamespace(probs=np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 0]], y_true=np.array([0, 1, 2, 3, 0, 1, 2, 3]))
    head, tuned = object(), object()  # the head's accuracy on these 8: 7/8

    def fit(acc: float, loss: float) -> FinetuneResult:
        return FinetuneResult(model=head, improved=False, unkept=tuned,
                              unkept_val={"val_acc": acc, "val_cal_loss": loss})

    kept = _within_tolerance(fit(0.875, 0.41), start, 0.40, multilabel=False, world=World())
    assert kept.model is tuned and kept.improved and kept.kept_by == "tolerance" and kept.unkept is None
    assert kept.to_record()["kept_by"] == "tolerance"
    from transferlab.finish import kept_warnings

    assert "0.8750" in kept_warnings(kept)[0] and "within 5% of the head's" in kept_warnings(kept)[0]
    assert "the head was kept" in kept_warnings(fit(0.75, 0.39))[0] and kept_warnings(None) == []
    for lost in (fit(0.75, 0.39), fit(0.875, 0.45)):  # less accurate, or clearly worse calibrated
        same = _within_tolerance(lost, start, 0.40, multilabel=False, world=World())
        assert same.model is head and not same.improved
    assert _within_tolerance(fit(0.875, 0.41), start, 0.40, multilabel=True, world=World()).model is head
