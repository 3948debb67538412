"""Planning: input size from the data, the time budget, measured costs, the probe head, MustPay."""

from __future__ import annotations

import json
import time

import lightning as L
import numpy as np
import pytest
import torch

from transferlab.data.images import ImageInfo
from transferlab.training.callbacks import BestWeights, MustPay
from transferlab.training.head import HeadConfig, fit_probe
from transferlab.training.module import ClassifierModule
from transferlab.training.plan import (Costs, candidate_sizes, make_plan, measure_costs, native_size,
                                       target_epochs, useful_size)


def _costs(scale: float = 1.0) -> Costs:
    """Per-image costs growing with pixels, as measured on this CPU (about 150 img/s eval and 26 img/s
    training at 224 px), times ``scale``."""
    return Costs({64: scale * 0.001, 224: scale * 0.0067}, {64: scale * 0.004, 224: scale * 0.038})


def test_native_and_useful_sizes():
    infos = {str(i): ImageInfo(width=28 + i % 3, height=28) for i in range(9)}
    assert native_size(infos) == 28
    assert native_size({}) is None
    assert useful_size(28, 224) == 128  # 4x upsampling, rounded to 32
    assert useful_size(8, 224) == 64  # never below the floor
    assert useful_size(500, 224) == 224  # large images: the backbone's size
    assert useful_size(None, 260) == 260
    assert candidate_sizes(28, 224) == [224, 192, 160, 128, 96, 64]
    assert candidate_sizes(300, 224)[0] == 288  # fine detail: may go above the backbone's size
    assert candidate_sizes(2000, 224)[0] == 320  # at most 1.5x (336), in steps of 32
    assert target_epochs(200) == 8 and target_epochs(54_000) == 2 and target_epochs(10_000) == 5


def test_costs_interpolate_with_pixels():
    c = _costs()
    assert c.eval_at(64) < c.eval_at(128) < c.eval_at(224) < c.eval_at(288)
    b = (0.0067 - 0.001) / (224 ** 2 - 64 ** 2)
    assert c.eval_at(128) == pytest.approx(0.001 + b * (128 ** 2 - 64 ** 2))
    assert Costs({96: 0.01}, {96: 0.02}).train_at(192) == pytest.approx(0.08)  # one point: by pixels


def test_budget_chooses_size_and_epochs():
    common = dict(native=28, default_size=224, n_train=1000, n_val=200, n_test=1000, finetune=True)
    n_ext = 2200
    roomy = make_plan(n_extract=n_ext, costs=_costs(), budget_s=900, **common)
    assert roomy.image_size == 224 and roomy.finetune and roomy.epochs == 8
    assert roomy.estimate["total"] <= 0.85 * 900
    tight = make_plan(n_extract=n_ext, costs=_costs(), budget_s=120, **common)
    assert 64 <= tight.image_size < 224 and tight.finetune and tight.estimate["total"] <= 0.85 * 120
    tighter = make_plan(n_extract=n_ext, costs=_costs(6.0), budget_s=120, **common)
    assert tighter.image_size == 64 and 0.5 <= tighter.epochs < 8  # a share of the wanted epochs
    hopeless = make_plan(n_extract=n_ext, costs=_costs(40.0), budget_s=120, **common)
    assert not hopeless.finetune and hopeless.epochs == 0
    assert any("no fine-tuning" in r for r in hopeless.reasons)
    json.dumps(hopeless.to_dict())


def test_no_budget_plan_estimates_and_validates_long_epochs_inside():
    plan = make_plan(native=28, default_size=224, n_extract=70_000, n_train=54_000, n_val=6_000, n_test=10_000,
                     costs=_costs(), finetune=True, budget_s=None, max_epochs=8)
    assert plan.image_size == 128 and plan.epochs == 8 and plan.budget_s is None
    ep = plan.estimate["finetune_epoch"]
    assert ep > 54_000 * _costs().train_at(128)  # training plus validation passes
    assert plan.val_every < 1.0  # an epoch of ~20 minutes is validated inside
    assert "estimated" in plan.describe()[0]
    fixed = make_plan(native=28, default_size=224, n_extract=10, n_train=10, n_val=0, n_test=0, costs=_costs(),
                      finetune=False, budget_s=None, image_size=96)
    assert fixed.image_size == 96 and not fixed.finetune
    frozen = make_plan(native=28, default_size=224, n_extract=10, n_train=10, n_val=0, n_test=0, costs=_costs(),
                       finetune=False, budget_s=None)
    assert frozen.image_size == 224 and any("frozen features" in r for r in frozen.reasons)


def test_measure_costs_grow_with_size_and_restore_the_model(photos_dir):
    from transferlab.backbones import Normalize

    model = torch.nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), torch.nn.Conv2d(3, 8, 3, stride=2),
                                torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    frozen = model[1].weight
    frozen.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from transferlab.data.transforms import Preprocessing

    paths = [str(p) for p in sorted(photos_dir.rglob("*.jpg"))[:3]]
    costs = measure_costs(model, Preprocessing(), [64, 160], paths, batch_size=4, workers=0)
    assert set(costs.eval_s) == set(costs.train_s) == {64, 160}
    assert all(v > 0 for v in [*costs.eval_s.values(), *costs.train_s.values()])
    assert not frozen.requires_grad and model[-1].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_probe_head_is_the_logistic_regression_it_fitted():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 2
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.normal(size=(300, 16))).astype(np.float32) * 50 + 7  # any feature scale
    res = fit_probe(x[:200], y[:200], x[200:], y[200:], 3, HeadConfig())
    assert res.c is not None and len(res.history) == 5
    head_pred = res.head(torch.from_numpy(x[200:])).argmax(1).numpy()
    std = (x[:200] - x[:200].mean(0)) / np.sqrt(x[:200].var(0, ddof=1).mean())
    ref = LogisticRegression(C=res.c, max_iter=500).fit(std, y[:200])
    ref_pred = ref.predict((x[200:] - x[:200].mean(0)) / np.sqrt(x[:200].var(0, ddof=1).mean()))
    assert np.mean(head_pred == ref_pred) >= 0.99
    assert np.mean(head_pred == y[200:]) > 0.9


def test_probe_head_binary_and_missing_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    x = (rng.normal(size=(120, 8)) + y[:, None] * 3).astype(np.float32)
    res = fit_probe(x, y, x[:0], y[:0], 3, HeadConfig())  # class 2 never seen, no validation split
    logits = res.head(torch.from_numpy(x)).detach()
    assert np.mean(logits.argmax(1).numpy() == y) > 0.95
    assert (logits.argmax(1) != 2).all()
    p = torch.softmax(logits, 1)[:, :2]
    from sklearn.linear_model import LogisticRegression

    std = (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1).mean())
    std = std / np.maximum(std.std(0), 0.1)  # each feature to unit variance (scikit-learn's StandardScaler)
    ref = LogisticRegression(C=res.c, max_iter=500).fit(std, y).predict_proba(std)
    assert np.allclose(p.numpy(), ref, atol=1e-3)


def _tiny_fit(callbacks, max_epochs=6):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = ClassifierModule(torch.nn.Linear(4, 2), lr=1e-2)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu")
    trainer.fit(module, dl, dl)
    return trainer


def test_must_pay_stops_a_finetuning_that_never_beats_its_start():
    best = BestWeights("val_cal_loss")
    best.best, best.best_epoch = -1.0, -1  # a starting point no epoch can beat
    pay = MustPay(best, limit_s=0.0)
    trainer = _tiny_fit([best, pay])
    assert pay.triggered and trainer.current_epoch < 5
    assert not best.improved and len(best.validations) == 1


def test_must_pay_lets_an_improving_finetuning_run():
    best = BestWeights("val_cal_loss")
    best.best, best.best_epoch = 1e9, -1
    pay = MustPay(best, limit_s=0.0)
    trainer = _tiny_fit([best, pay], max_epochs=3)
    assert not pay.triggered and best.improved and trainer.current_epoch == 3
    assert [v["step"] for v in best.validations] == [4, 8, 12]


def test_best_weights_keep_the_averaged_weights():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class LastRaw(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    ema, raw = EMAWeightAveraging(decay=0.5), LastRaw()
    best = BestWeights("val_cal_loss", averaging=ema)
    trainer = _tiny_fit([raw, ema, best], max_epochs=2)
    assert best.improved and best.best_epoch == 1  # the loss keeps falling on this easy problem
    averaged = {k[len("module."):]: v for k, v in ema._average_model.state_dict().items() if k.startswith("module.")}
    final = trainer.lightning_module.state_dict()
    for k, v in best.state.items():
        assert torch.allclose(v, averaged[k]) and torch.allclose(final[k], v)
    assert not torch.allclose(raw.raw["model.weight"], best.state["model.weight"])  # not the last iterate


def test_a_schedule_run_to_its_end_keeps_its_final_weights_when_asked():
    """With ``keep_final`` a fit that ran its schedule out ends with its final averaged weights, though its
    best validation came first; without it, or when a callback stopped the fit, the best are kept."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class FirstIsBest(L.Callback):  # no validation after the first beats it
        def __init__(self, best: BestWeights, stop_at: int | None = None) -> None:
            self.best, self.stop_at = best, stop_at

        def on_validation_end(self, trainer, pl_module) -> None:
            self.best.best = -1e9
            if self.stop_at is not None and trainer.current_epoch + 1 >= self.stop_at:
                trainer.should_stop = True

    def fit(keep_final: bool, stop_at: int | None = None):
        ema = EMAWeightAveraging(decay=0.5)
        best = BestWeights("val_cal_loss", averaging=ema, keep_final=keep_final)
        trainer = _tiny_fit([ema, best, FirstIsBest(best, stop_at)], max_epochs=4)
        averaged = {k[len("module."):]: v for k, v in ema._average_model.state_dict().items()
                    if k.startswith("module.")}
        return best, trainer.lightning_module.state_dict(), averaged

    best, ended, averaged = fit(keep_final=True)
    assert best.kept == "final" and best.best_epoch == 0 and best.improved
    assert torch.allclose(ended["model.weight"], averaged["model.weight"])
    assert not torch.allclose(ended["model.weight"], best.state["model.weight"])  # not the first epoch's
    for keep_final, stop_at in ((False, None), (True, 2)):
        best, ended, _ = fit(keep_final, stop_at)
        assert best.kept == "best" and torch.allclose(ended["model.weight"], best.state["model.weight"])


def test_a_plan_for_cached_activations_counts_the_views_and_cheap_epochs():
    from transferlab.training.plan import CACHED_EPOCHS, CACHED_VIEWS

    common = dict(native=300, default_size=224, n_extract=2200, n_train=1000, n_val=200, n_test=1000,
                  finetune=True, budget_s=300)
    whole = make_plan(costs=_costs(), **common)
    # a step that trains the top stages alone, measured as the pipeline measures it: the forward pass and a
    # backward pass through the top (here 1.6x the evaluation cost, against 5.7x for the whole network)
    c = Costs(_costs().eval_s, {64: 0.0016, 224: 0.0107})
    cached = make_plan(costs=c, cached=True, **common)
    assert cached.image_size > whole.image_size and cached.epochs == CACHED_EPOCHS
    size = cached.image_size
    assert cached.estimate["cache"] == pytest.approx((CACHED_VIEWS * 1000 + 200) * c.eval_at(size), rel=1e-3)
    assert cached.estimate["finetune_epoch"] < 1000 * c.train_at(size)  # a training step less a forward pass
    assert cached.estimate["total"] <= 0.85 * 300 and "cached views" in cached.reasons[0]


def test_the_whole_networks_epochs_that_fit_are_what_the_budget_holds_after_the_rest():
    from transferlab.training.plan import BUDGET_FILL, estimate, epochs_fit

    parts = dict(n_extract=0, n_train=1000, n_val=200, n_test=1000, head_s=5.0, elapsed_s=30.0)
    c = _costs()
    fit = epochs_fit(c, 224, budget_s=900.0, **parts)
    # that many epochs fill the plan's share of the budget (to within its last validation pass)
    total, val_s = estimate(c, 224, fit, budget_s=900.0, **parts)["total"], 200 * c.eval_at(224)
    assert fit > 10 and abs(total - BUDGET_FILL * 900) <= val_s
    assert epochs_fit(c, 224, budget_s=300.0, **parts) < fit  # a shorter budget holds fewer
    assert epochs_fit(c, 224, budget_s=10.0, **parts) == 0.0  # nothing left after the rest


@pytest.mark.parametrize("budget_s, scale, whole", [(900.0, 0.1, True), (120.0, 1.0, False)])
def test_under_a_limit_the_whole_network_trains_where_it_fits_the_epochs_of_the_top(monkeypatch, budget_s, scale,
                                                                                     whole):
    """The plan for the top stages on cached activations is checked against the whole network's measured cost at
    its size: where the budget holds as many whole epochs, the plan becomes the whole network's, and the figures
    are recorded either way with a line for the printed plan."""
    from types import SimpleNamespace

    import transferlab.planning as planning
    from transferlab.training.plan import CACHED_EPOCHS

    monkeypatch.setattr(planning, "measure_costs", lambda *a, **k: _costs(scale))
    monkeypatch.setattr(planning, "_trainable", lambda *a, **k: [])
    parts = dict(native=28, n_extract=600, n_train=200, n_val=200, n_test=200, finetune=True, budget_s=budget_s,
                 max_epochs=40, head_s=5.0)
    top = make_plan(default_size=224, costs=_costs(scale), cached=True, **parts)
    cfg = SimpleNamespace(seed=0, ft_batch_size=32, frozen_stride=4, mixed_precision=True, workers=0,
                          time_limit=budget_s)
    plan = planning._whole_or_top(top, None, SimpleNamespace(preprocessing=None), cfg, [], parts, time.time())
    record = plan.decisions["whole_network"]
    assert record["whole"] is whole and (record["epochs_fit"] >= CACHED_EPOCHS) is whole
    assert record["size"] == top.image_size == plan.image_size and record["line"].startswith("whole network: ")
    if whole:  # the whole network's plan: its own epochs and costs, not the cached views'
        assert "cache" not in plan.estimate and plan.epochs != CACHED_EPOCHS
    else:
        assert plan.estimate == top.estimate and "top stages fine-tune" in record["line"]
