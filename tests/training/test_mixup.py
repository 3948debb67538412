"""Mixed batches (MixUp or CutMix) in fine-tuning: when they apply, what a mixed step trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from transferlab.config import TrainConfig
from transferlab.errors import ConfigError
from transferlab.training.finetune import MIXUP_MIN_EPOCHS, FinetuneConfig, batch_mixer, fit_finetune, mixes
from transferlab.training.module import ClassifierModule


def test_mixing_is_for_a_pretrained_networks_long_single_label_schedule():
    long, short = FinetuneConfig(epochs=MIXUP_MIN_EPOCHS), FinetuneConfig(epochs=MIXUP_MIN_EPOCHS - 0.1)
    assert mixes(long) and not mixes(short)
    assert not mixes(long, pretrained=False)  # the scratch CNN's recipe was measured without it
    assert not mixes(FinetuneConfig(epochs=20, multilabel=True))
    assert mixes(FinetuneConfig(epochs=1, mixup="on")) and not mixes(FinetuneConfig(epochs=20, mixup="off"))
    assert not mixes(FinetuneConfig(epochs=20, mixup="on", multilabel=True))
    with pytest.raises(ConfigError, match="mixup 'sometimes'"):
        TrainConfig(ft_mixup="sometimes").validate()


def test_the_mixer_blends_images_and_soft_smoothed_targets():
    np.random.seed(0)  # timm draws the mixing weight with numpy
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 1])
    xm, soft = batch_mixer(3, label_smoothing=0.1)(x.clone(), y)
    assert xm.shape == x.shape and soft.shape == (4, 3)
    assert torch.allclose(soft.sum(1), torch.ones(4)) and bool((soft > 0).all())  # smoothed: no class at 0
    assert not torch.equal(xm, x)  # each image blended with (or patched from) its partner in the flipped batch


class _Recorder:
    """A mixer that swaps in fixed inputs and targets, and counts its calls."""

    def __init__(self, x: torch.Tensor, soft: torch.Tensor) -> None:
        self.x, self.soft, self.calls = x, soft, 0

    def __call__(self, x, y):
        self.calls += 1
        return self.x, self.soft


def test_a_training_step_learns_the_mixed_targets_and_an_odd_batch_trains_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    mixed_x, soft = torch.randn(4, 3, 2, 2), torch.softmax(torch.randn(4, 3), 1)
    mixer = _Recorder(mixed_x, soft)
    module = ClassifierModule(model, mix=mixer)
    module.log = lambda *a, **k: None  # no Trainer here to log to
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    loss, _ = module._step((x, y), "train")
    assert mixer.calls == 1
    assert torch.allclose(loss, F.cross_entropy(model(mixed_x), soft))
    odd = module._step((x[:3], y[:3]), "train")[0]  # timm mixes pairs from the flipped batch: even sizes only
    assert mixer.calls == 1 and torch.allclose(odd, F.cross_entropy(model(x[:3]), y[:3]))
    val = module._step((x, y), "val")[0]  # validation never mixes
    assert mixer.calls == 1 and torch.allclose(val, F.cross_entropy(model(x), y))


@pytest.mark.slow
def test_finetuning_on_mixed_batches_trains_and_says_so(digits_dir, tmp_path):
    from transferlab.backbones import build_head, create_backbone
    from transferlab.backbones.models import Classifier
    from transferlab.training.callbacks import History

    bb, info = create_backbone("simple_cnn", pretrained=False, image_size=32)
    model = Classifier(bb, build_head(info.num_features, 2), info.preprocessing)
    paths = [str(p) for c in ("0", "1") for p in sorted((digits_dir / c).iterdir())[:8]]
    labels = [0] * 8 + [1] * 8
    before = [p.detach().clone() for p in model.parameters()]
    cfg = FinetuneConfig(epochs=2, freeze_epochs=0, batch_size=4, workers=0, quiet=True, ema=False, mixup="on")
    res = fit_finetune(model, paths, labels, paths[::4], labels[::4], cfg, tmp_path / "run",
                       History(None, "finetune"), pretrained=False)
    assert res.mixup and res.epochs_run == 2 and res.validations
    assert any(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))
    plain = fit_finetune(Classifier(bb, build_head(info.num_features, 2), info.preprocessing), paths, labels,
                         paths[::4], labels[::4], FinetuneConfig(epochs=1, freeze_epochs=0, batch_size=4, workers=0,
                                                                 quiet=True, ema=False), tmp_path / "plain",
                         History(None, "finetune"), pretrained=False)
    assert not plain.mixup


def test_stochastic_depth_drops_branches_in_training_only_and_leaves_the_network_as_it_was():
    from transferlab.backbones import create_backbone
    from transferlab.training.finetune import stochastic_depth

    with pytest.raises(ConfigError, match="drop_path 1.0"):
        TrainConfig(ft_drop_path=1.0).validate()
    torch.manual_seed(0)
    bb, _ = create_backbone("efficientnet_lite0", pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    stats = {k: v.clone() for k, v in bb.state_dict().items()}  # a training pass moves BatchNorm's statistics
    with torch.no_grad():
        trained = bb.train()(x)  # batch statistics: the same for the same batch
        bb.load_state_dict(stats)
        plain = bb.eval()(x)
        with stochastic_depth(bb, 0.5) as n:
            rates = [m.drop_path.drop_prob for m in bb.modules() if hasattr(m, "drop_path")]
            assert n == len(rates) > 2 and rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)
            assert torch.equal(bb(x), plain)  # inference never drops a branch
            assert not torch.equal(bb.train()(x), trained)  # training does
        bb.load_state_dict(stats)
        bb.eval()
        assert all(isinstance(m.drop_path, nn.Identity) for m in bb.modules() if hasattr(m, "drop_path"))
        assert torch.equal(bb(x), plain)
