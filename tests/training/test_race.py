"""The race of training recipes: successive halving's rules, the portfolio, and a race recorded end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from transferlab.decisions import portfolio, skips_head
from transferlab.strategy import budget_record
from transferlab.training.recipes import Recipe
from transferlab.training.race import (RACE_SHARE, RungResult, projected_error, slice_seconds,
                                      successive_halving)


def _cands(*names: str) -> list[Recipe]:
    return [Recipe(n, f"the {n} recipe") for n in names]


def test_successive_halving_keeps_the_better_half_and_doubles_the_slice():
    quality = {"a": 0.6, "b": 0.9, "c": 0.7, "d": 0.8}
    calls = []

    def run(c, seconds, rung):
        calls.append((c.name, seconds, rung))
        return RungResult(quality[c.name] + 0.01 * rung, 1 - quality[c.name], seconds)

    lines = []
    race = successive_halving(_cands("a", "b", "c", "d"), 10.0, run, announce=lines.append, horizon_s=100.0)
    assert [c for c in calls if c[2] == 0] == [("a", 10.0, 0), ("b", 10.0, 0), ("c", 10.0, 0), ("d", 10.0, 0)]
    assert sorted(c[0] for c in calls if c[2] == 1) == ["b", "d"] and all(c[1] == 20.0 for c in calls if c[2] == 1)
    assert len(calls) == 6 and race.winner.name == "b"
    assert race.status == {"a": "dropped after rung 1", "c": "dropped after rung 1", "d": "dropped after rung 2",
                           "b": "survivor"}
    record = race.to_dict()
    assert record["winner"] == "b" and [len(c["rungs"]) for c in record["candidates"]] == [1, 2, 1, 2]
    assert any("d dropped" in line for line in lines)
    json.dumps(record, allow_nan=False)


def test_the_last_two_are_judged_at_the_survivors_horizon_not_at_the_slice():
    # "fast" is ahead after 10 s and 20 s but flattens; "slow" learns steadily and overtakes it by 500 s
    curve = {"fast": {0: 0.86, 1: 0.87}, "slow": {0: 0.80, 1: 0.85}}
    race = successive_halving(_cands("fast", "slow"), 10.0,
                              lambda c, s, r: RungResult(curve[c.name][r], 0.5, s), horizon_s=500.0)
    assert [len(r) for r in race.rungs] == [2, 2]  # both run twice: slices of 10 s and 20 s
    assert race.winner.name == "slow"
    projected = {r["candidate"]: r["projected_val_acc"] for r in race.rungs[-1]}
    assert projected["slow"] > projected["fast"] > 0.87
    short = successive_halving(_cands("fast", "slow"), 10.0,
                               lambda c, s, r: RungResult(curve[c.name][r], 0.5, s), horizon_s=20.0)
    assert short.winner.name == "fast"  # at the slice's own length, the one ahead wins
    assert projected_error([(10.0, 0.2)], 100.0) == pytest.approx(0.2)
    assert projected_error([(10.0, 0.2), (20.0, 0.25)], 100.0) == pytest.approx(0.25)  # no gain: flat
    assert projected_error([(10.0, 0.2), (20.0, 0.1)], 40.0) == pytest.approx(0.05)  # alpha capped at 1


def test_a_tie_on_accuracy_goes_to_the_lower_loss_and_a_failed_rung_loses():
    scores = {"a": (0.8, 0.5), "b": (0.8, 0.3), "c": (-1.0, float("nan"))}
    race = successive_halving(_cands("a", "b", "c"), 10.0, lambda c, s, r: RungResult(*scores[c.name], s))
    assert race.winner.name == "b" and race.status["c"] == "dropped after rung 1"
    json.dumps(race.to_dict(), allow_nan=False)  # a rung that never validated is recorded as null, not NaN


def test_no_race_with_one_candidate_or_a_slice_too_short():
    def never(*_):
        raise AssertionError("nothing should train in a race that does not run")

    one = successive_halving(_cands("a"), 100.0, never)
    short = successive_halving(_cands("a", "b"), 1.0, never)
    assert one.winner.name == short.winner.name == "a" and not short.rungs
    assert "too short" in short.reason and short.status["b"] == "not raced"
    with pytest.raises(ValueError):
        successive_halving([], 10.0, never)


def test_slice_shares_the_race_budget_over_every_rung():
    assert slice_seconds(2, 600.0) == pytest.approx(RACE_SHARE * 600 / (2 + 2 * 2))  # two, twice
    assert slice_seconds(3, 700.0) == pytest.approx(RACE_SHARE * 700 / (3 + 2 * 2))  # 3 -> 2 at 2x
    assert slice_seconds(8, 800.0) == pytest.approx(RACE_SHARE * 800 / (8 + 4 * 2 + 2 * 4))  # 8 -> 4 -> 2
    assert slice_seconds(1, 300.0) == 0.0


def test_the_registry_is_the_one_list_of_recipes(monkeypatch):
    from transferlab.config import TrainConfig
    from transferlab.errors import ConfigError
    from transferlab.training import recipes

    assert recipes.recipe_names() == ("recipe", "bn-adapt", "orient", "top", "transfer", "scratch")
    assert [r.name for r in recipes.RECIPES.values() if not r.from_head] == ["transfer", "scratch"]
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    rows = [line.strip() for line in readme.splitlines()
            if line.strip().startswith("| `") and line.strip().split("`")[1] in recipes.RECIPES]
    assert rows == [f"| `{r.name}` | {r.description} |" for r in recipes.RECIPES.values()]  # README's list
    monkeypatch.setattr(recipes, "RECIPES", dict(recipes.RECIPES))
    recipes.register_recipe(Recipe("low-lr", "the recipe at a tenth of the rate", options={"lr": 1e-4}))
    TrainConfig(candidates=("low-lr",)).validate()  # a registered recipe is a valid candidate at once
    assert [c.name for c in portfolio(None, 10, True, ("low-lr",))] == ["low-lr"]
    with pytest.raises(ValueError, match="already registered"):
        recipes.register_recipe(Recipe("recipe", "again"))
    with pytest.raises(TypeError):
        recipes.get_recipe("low-lr").options["lr"] = 1.0  # a recipe is data: its options cannot change
    with pytest.raises(ConfigError, match="'finetun'"):
        TrainConfig(candidates=("finetun",)).validate()
    with pytest.raises(ConfigError, match="'best'"):
        TrainConfig(recipe="best").validate()


def test_portfolio_follows_the_data():
    many_small = portfolio(28, 54_000, True)
    assert [c.name for c in many_small] == ["transfer", "scratch"] and skips_head(many_small)
    few_small = portfolio(28, 1_000, True)
    assert [c.name for c in few_small] == ["recipe"] and not skips_head(few_small)
    assert [c.name for c in portfolio(300, 54_000, True)] == ["recipe"]
    assert [c.name for c in portfolio(28, 54_000, False)] == ["transfer"]
    assert [c.name for c in portfolio(None, 10, True, ("orient", "recipe", "orient"))] == ["orient", "recipe"]


def test_the_budget_says_why_the_run_ended_where_it_did():
    """A schedule that ran to its end long after its own best validation converged (early stopping's test,
    after the fact); one whose validation rose at every check was still improving, even if none beat the head
    it started from; a shortened one says so."""
    from transferlab.training.finetune import FinetuneResult

    def ended(losses: list[float], shortened: int | None = None, accs: list[float] | None = None,
              beat_start: bool = True, by_time: bool = False) -> dict:
        accs = accs or [None] * len(losses)
        vals = [{"epoch": float(e), "val_loss": v, "val_acc": a, "best": beat_start and v == min(losses[:e])}
                for e, (v, a) in enumerate(zip(losses, accs), start=1)]
        ft = FinetuneResult(model=None, validations=vals, epochs_run=len(losses), shortened_to=shortened,
                            stopped_by_time=by_time)
        return budget_record(900.0, 600.0, ft, patience=3)

    converged = ended([0.9, 0.8, 0.85, 0.8, 0.7] + [0.75] * 7)
    assert converged["unused_s"] == 300.0 and converged["epochs_without_gain"] == 7
    assert "converged" in converged["why"] and "7 epochs after its best" in converged["why"]
    assert not converged["still_improving"]
    # the inspection run of issue 36: accuracy rose at every check after the third, none beat the head's 0.848
    rising = ended([0.61, 0.62, 0.63, 0.55, 0.5, 0.47, 0.42, 0.40],
                   accs=[0.79, 0.76, 0.75, 0.80, 0.82, 0.83, 0.85, 0.855], beat_start=False)
    assert rising["still_improving"] and rising["epochs_without_gain"] == 0
    assert "converged" not in rising["why"] and "still improving" in rising["why"] and "--time-limit" in rising["why"]
    stopped = ended([0.9, 0.8, 0.7], by_time=True)
    assert stopped["why"].startswith("the time limit stopped the survivor, still improving")
    gaining = ended([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.44, 0.43, 0.42, 0.41, 0.40, 0.41])
    assert gaining["epochs_without_gain"] == 1 and not gaining["still_improving"]
    assert gaining["why"] == "the survivor's planned epochs ended before the limit"
    cut = ended([0.9] * 9 + [0.5, 0.6, 0.6], shortened=12)
    assert "shortened to 12 epochs" in cut["why"] and "converged" not in cut["why"]
    assert budget_record(None, 60.0, None)["unused_s"] is None


@pytest.mark.slow
def test_a_race_on_tiny_data_records_every_candidate(digits_dir, tmp_path, monkeypatch):
    """Three recipes raced end to end, one of them registered here in one line: each trains with its own
    options, and the race is recorded in metrics.json, plan.json, config.json and the report."""
    import transferlab.strategy as strategy
    from transferlab.pipeline import train
    from transferlab.training import recipes

    monkeypatch.setattr(recipes, "RECIPES", dict(recipes.RECIPES))
    recipes.register_recipe(Recipe("turns-slow", "quarter turns at half the rate",
                                   options={"augment": "orient", "lr": 5e-4}))
    fits = []
    fit = strategy.fit_finetune
    monkeypatch.setattr(strategy, "fit_finetune", lambda model, *a, **k: fits.append(a[4]) or fit(model, *a, **k))
    # every rung trains the run's whole (one-epoch) schedule: the race does not depend on this machine's speed
    monkeypatch.setattr(strategy, "slice_seconds", lambda n, budget: 1e6)
    res = train(digits_dir, tmp_path / "run", mode="auto", ft_epochs=1, image_size=64, workers=0, quiet=True,
                diagnose=False, candidates=("recipe", "bn-adapt", "turns-slow"))
    assert [(f.augment, f.lr, f.train_bn) for f in fits[:3]] == [("light", 1e-3, False), ("light", 1e-3, True),
                                                                ("orient", 5e-4, False)]
    race = res.metrics["strategy"]
    assert [c["name"] for c in race["candidates"]] == ["recipe", "bn-adapt", "turns-slow"]
    assert all(c["rungs"] and c["rungs"][0]["validations"] for c in race["candidates"])
    assert sorted(len(c["rungs"]) for c in race["candidates"]) == [1, 2, 2]  # 3 -> 2 -> 1
    assert sorted(c["status"] for c in race["candidates"]) == ["dropped after rung 1", "dropped after rung 2",
                                                              "survivor"]
    assert race["survivor"]["name"] == race["winner"] and race["survivor"]["epochs_planned"] == 1
    assert race["survivor"]["mixup"] is False  # a one-epoch schedule trains on plain batches
    assert res.metrics["budget"]["limit_s"] is None
    both = res.metrics["head_and_finetuned"]  # the network not kept is recorded too
    assert both["kept"] == ("finetuned" if res.metrics["finetune"]["kept"] else "head")
    assert both["head"]["val_accuracy"] is not None and both["finetuned"]["best_val_accuracy"] is not None
    assert both[both["kept"]]["test_accuracy"] == pytest.approx(res.metrics["test"]["accuracy"], abs=1e-4)
    assert both["head"]["test_accuracy"] is not None and both["finetuned"]["test_accuracy"] is not None
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["race"]["winner"] == race["winner"]
    config = json.loads((res.model_dir / "config.json").read_text())
    assert config["training"]["decision"]["winner"] == race["winner"]
    html = (res.run_dir / "report.html").read_text()
    assert "Training strategy: the race" in html and "bn-adapt" in html
    assert not (res.run_dir / "race").exists()  # the rungs leave no checkpoints behind


@pytest.mark.slow
def test_a_run_whose_budget_fits_no_fine_tuning_still_trains_something(digits_dir, tmp_path, monkeypatch):
    """Full Fashion-MNIST in 5 minutes: the race skipped the head (transfer against scratch), then the plan
    found no room for an epoch of the pretrained network, and nothing trained. The scratch CNN alone trains
    then, and without it the head."""
    import transferlab.pipeline as pipeline

    plan_finetune = pipeline.plan_finetune
    # no fine-tuning fits; the plan's epochs (3) are what the fallback trains, so that the loss can be seen falling
    monkeypatch.setattr(pipeline, "plan_finetune", lambda *a, **k: dataclasses.replace(
        plan_finetune(*a, **k), finetune=False, epochs=3.0))
    opts = dict(mode="auto", image_size=64, workers=0, quiet=True, diagnose=False)
    res = pipeline.train(digits_dir, tmp_path / "scratch", candidates=("transfer", "scratch"), **opts)
    assert res.metrics["strategy"]["winner"] == "scratch" and res.metrics["finetune"]["epochs_run"] == 3
    assert any("scratch CNN alone" in r for r in res.metrics["plan"]["reasons"])
    rows = [r for r in csv.DictReader(open(res.run_dir / "logs" / "history.csv")) if r["phase"] == "finetune"]
    assert len(rows) == 3 and float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])  # it learned
    assert res.metrics["test"]["accuracy"] is not None
    res = pipeline.train(digits_dir, tmp_path / "head", candidates=("transfer",), **opts)
    assert res.metrics["finetune"] is None and res.metrics["test"]["accuracy"] > 0.5  # the head: 10 classes
    assert any("head is trained instead" in r for r in res.metrics["plan"]["reasons"])


@pytest.mark.slow
def test_recipe_single_keeps_the_one_recipe(digits_dir, tmp_path):
    from transferlab.pipeline import train

    res = train(digits_dir, tmp_path / "run", mode="auto", ft_epochs=1, image_size=64, workers=0, quiet=True,
                diagnose=False, recipe="single")
    assert res.metrics["strategy"] is None and res.metrics["finetune"]["epochs_run"] >= 1


@pytest.mark.slow
def test_a_scratch_winner_is_one_network_that_predicts_and_exports(digits_dir, tmp_path):
    from transferlab.export import export_model
    from transferlab.pipeline import train
    from transferlab.predict import load_model

    res = train(digits_dir, tmp_path / "run", mode="auto", ft_epochs=2, workers=0, quiet=True, diagnose=False,
                candidates=("scratch",))
    config = json.loads((res.model_dir / "config.json").read_text())
    assert config["backbone"]["name"] == "simple_cnn" and not config["backbone"]["pretrained"]
    assert config["preprocessing"]["size"] == 64  # the digits' own resolution, not the pretrained network's
    assert config["training"]["decision"]["winner"] == "scratch"
    assert res.metrics["timing"]["extract_s"] == 0.0  # no frozen-feature head before a network from scratch
    preds = load_model(res.model_dir).predict([str(next(digits_dir.rglob("*.png")))])
    assert preds[0].label in [str(i) for i in range(10)]
    check = export_model(res.model_dir, "onnx")
    assert check["passed"]


def test_the_plan_counts_the_race_without_a_limit_and_keeps_a_limit_whole():
    from transferlab.strategy import RUNG_START_S, with_race_estimate
    from transferlab.training.plan import Plan

    est = {"finetune": 200.0, "total": 300.0}
    two = portfolio(300, 1000, True, ("recipe", "bn-adapt"))
    free = with_race_estimate(Plan(64, 28, True, 8.0, estimate=dict(est)), two)
    assert free.estimate["race"] == pytest.approx(RACE_SHARE * 200 + 4 * RUNG_START_S)  # two candidates, twice
    assert free.estimate["total"] == pytest.approx(300 + free.estimate["race"])
    assert any(r.startswith("race: recipe against bn-adapt") for r in free.reasons)
    bounded = with_race_estimate(Plan(64, 28, True, 8.0, budget_s=900.0, estimate=dict(est)), two)
    assert bounded.estimate == est  # under a limit the race and the survivor share the budget
