"""Fine-tuning the top stages on cached activations (recipe ``top``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from transferlab.backbones import build_head, create_backbone
from transferlab.backbones.models import Classifier
from transferlab.pipeline import train
from transferlab.training import cached
from transferlab.training.cached import ActivationStore, fit_cached, split_top
from transferlab.training.callbacks import History
from transferlab.training.finetune import FinetuneConfig

FAST = dict(image_size=64, workers=0, ft_batch_size=16, quiet=True)


@pytest.fixture
def short(monkeypatch):
    """Fits of a few epochs (the module's own lengths are for real data), raced one epoch per policy."""
    monkeypatch.setattr(cached, "EPOCHS_NO_LIMIT", 4)
    monkeypatch.setattr(cached, "RACE_EPOCHS", 1.0)
    monkeypatch.setattr(cached, "VIEWS_NO_LIMIT", 2)


def _classifier(n_classes: int = 3, **kw) -> Classifier:
    backbone, info = create_backbone("efficientnet_lite0", **kw)
    return Classifier(backbone, build_head(info.num_features, n_classes), info.preprocessing)


def test_the_two_parts_compute_the_whole_network():
    model = _classifier().eval()
    split = split_top(model)
    assert split is not None and 0 < split.cut < len(model.backbone.model.blocks)
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        a = split.lower(x)
        assert a.shape[-1] == 6  # 96 px at output stride 16: the lower part ends before the last stride
        assert torch.allclose(split.upper(a), model(x), atol=1e-5)
    lower = {id(p) for p in split.lower.parameters()}
    assert lower.isdisjoint(id(p) for p in split.upper.parameters())
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in split.upper.parameters()}


def test_networks_that_cannot_be_cut_there_are_refused():
    assert split_top(_classifier(cut_stage=3)) is None
    backbone, info = create_backbone("simple_cnn", pretrained=False)
    assert split_top(Classifier(backbone, build_head(info.num_features, 2), info.preprocessing)) is None


def test_activations_go_to_disk_beyond_the_memory_budget(tmp_path):
    store = ActivationStore((2, 3, 3), tmp_path / "acts", memory_bytes=5 * 18 * 2)
    first, second = store.new_view(5), store.new_view(5)  # the first fits in memory, the second does not
    assert store.on_disk == 1 and (tmp_path / "acts" / "view1.f16").is_file()
    first[:] = torch.arange(5, dtype=torch.float16).view(5, 1, 1, 1)
    second[:] = -torch.arange(5, dtype=torch.float16).view(5, 1, 1, 1)
    got = store.gather(torch.tensor([4, 1, 2]), torch.tensor([0, 1, 1]))
    assert got.dtype == torch.float32 and got[:, 0, 0, 0].tolist() == [4.0, -1.0, -2.0]
    store.close()
    assert not (tmp_path / "acts").exists()


def _digits(digits_dir, every: int = 1):
    from transferlab.data.scan import scan

    samples = sorted(scan(digits_dir).samples, key=lambda s: s.path)[::every]
    classes = sorted({s.label for s in samples})
    model = _classifier(len(classes))
    model.preprocessing = replace(model.preprocessing, size=64)
    return model, classes, samples[::2], samples[1::2]


def test_fit_trains_the_top_only_and_races_the_batchnorm_policy(digits_dir, tmp_path, short):
    model, classes, train_s, val_s = _digits(digits_dir)
    split = split_top(model)
    lower_before = [p.detach().clone() for p in split.lower.parameters()]
    upper_before = [p.detach().clone() for p in split.upper.parameters()]
    cfg = FinetuneConfig(workers=0, batch_size=16, quiet=True, seed=3, cached=True)
    history = History(tmp_path / "history.csv", "finetune")
    ft = fit_cached(model, [s.path for s in train_s], [classes.index(s.label) for s in train_s],
                    [s.path for s in val_s], [classes.index(s.label) for s in val_s], cfg, tmp_path, history)
    assert all(torch.equal(a, b) for a, b in zip(lower_before, split.lower.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(upper_before, split.upper.parameters()))
    assert ft.improved and ft.cached["views"] == 2 and ft.cached["rows"] == len(train_s)
    race = ft.decisions["bn_policy"]
    assert race["chosen"] in ("frozen", "adapt") and ft.cached["bn_policy"] == race["chosen"]
    assert race[race["chosen"]]["val_cal_loss"] <= min(race["frozen"]["val_cal_loss"], race["adapt"]["val_cal_loss"])
    assert len(ft.validations) == ft.epochs_run == 4 and sum(v["best"] for v in ft.validations) >= 1
    assert (tmp_path / "history.csv").is_file() and not (tmp_path / "activations").exists()
    assert all(p.requires_grad for p in model.parameters())  # as it found them


def test_a_fit_that_does_not_beat_its_start_keeps_it_and_hands_back_the_loser(digits_dir, tmp_path, short):
    model, classes, train_s, val_s = _digits(digits_dir, every=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(workers=0, batch_size=16, quiet=True, cached=True, initial_val_loss=-1.0)  # unbeatable
    ft = fit_cached(model, [s.path for s in train_s], [classes.index(s.label) for s in train_s],
                    [s.path for s in val_s], [classes.index(s.label) for s in val_s], cfg, tmp_path,
                    History(None, "finetune"))
    assert not ft.improved and ft.model is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())
    assert ft.unkept is not None and any(not torch.equal(v, ft.unkept.state_dict()[k]) for k, v in start.items())


def test_a_run_with_recipe_top_records_its_decisions(digits_dir, tmp_path, short):
    res = train(digits_dir, tmp_path / "run", candidates=("top",), **FAST)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    survivor = metrics["strategy"]["survivor"]
    assert survivor["name"] == "top" and survivor["cached"]["views"] >= 1
    bn = metrics["plan"]["decisions"]["bn_policy"]
    assert bn["chosen"] in ("frozen", "adapt") and "BatchNorm" in bn["line"]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["decisions"]["bn_policy"]["chosen"] == bn["chosen"]
    assert res.metrics["test"]["accuracy"] > 0.5
    both = metrics["head_and_finetuned"]
    assert both["head"]["test_accuracy"] is not None and both["finetuned"]["test_accuracy"] is not None


def test_only_one_cpu_process_trains_on_cached_activations(monkeypatch, tmp_path):
    import transferlab.strategy as strategy

    monkeypatch.setattr(strategy, "fit_cached", lambda *a, **k: "cached")
    monkeypatch.setattr(strategy, "fit_finetune", lambda *a, **k: "files")
    model, data = _classifier(), ([], [])

    def path(**kw) -> str:
        return strategy.fit_recipe(model, data, data, FinetuneConfig(cached=True, **kw), tmp_path, History(None))

    assert path(accelerator="cpu") == "cached"
    assert path(accelerator="gpu") == "files"  # a GPU runs the whole network's epochs cheaply
    assert path(accelerator="cpu", devices=2) == "files" and path(accelerator="cpu", multilabel=True) == "files"
    assert strategy.fit_recipe(model, data, data, FinetuneConfig(), tmp_path, History(None)) == "files"
