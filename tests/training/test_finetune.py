"""Fine-tuning: resume after SIGKILL, time limit, baselines and head shapes (DDP: tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transferlab.backbones import build_head, create_backbone
from transferlab.pipeline import train
from transferlab.predict import load_model


FAST = ["--image-size", "64", "--workers", "0", "--ft-batch-size", "16", "-q"]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "transferlab.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finetune_rows(run: Path) -> int:
    hist = run / "logs" / "history.csv"
    if not hist.exists():
        return 0
    return sum(1 for line in hist.read_text().splitlines() if ",finetune," in line)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(digits_dir, tmp_path):
    args = [str(digits_dir), "--mode", "finetune", "--ft-epochs", "2", "--freeze-epochs", "1", "--seed", "5",
            "--recipe", "single", *FAST]
    full = _cli("train", *args, "--out", str(tmp_path / "full"))
    killed = _cli("train", *args, "--out", str(tmp_path / "killed"))
    deadline = time.time() + 300
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    while not last.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the second epoch
    assert killed.poll() is None, "run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = _cli("train", "--resume", str(tmp_path / "killed"), "-q")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert full.wait(timeout=600) == 0, full.stderr.read()
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert abs(a["test"]["accuracy"] - b["test"]["accuracy"]) <= 0.01
    assert abs(a["test"]["macro_f1"] - b["test"]["macro_f1"]) <= 0.01
    assert _finetune_rows(tmp_path / "killed") == _finetune_rows(tmp_path / "full") == 3
    load_model(tmp_path / "killed" / "model").predict_proba([str(next(digits_dir.rglob("*.png")))])


@pytest.mark.slow
def test_time_limit_plans_the_epochs(digits_dir, tmp_path):
    res = train(digits_dir, tmp_path / "run", mode="auto", ft_epochs=200, ft_patience=200, time_limit=60,
                image_size=64, workers=0, quiet=True, diagnose=False, recipe="single")
    plan = res.metrics["plan"]
    assert plan["budget_s"] == 60 and plan["image_size"] == 64
    assert plan["epochs"] <= 8  # what is worth planning for 140 images, not the 200 allowed
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["epochs"] == plan["epochs"]
    assert res.metrics["finetune"]["validations"]  # every validation pass is recorded


@pytest.mark.slow
def test_the_deadline_stops_a_run_the_plan_thought_would_fit(digits_dir, tmp_path, monkeypatch):
    import transferlab.planning as planning
    import transferlab.training.plan as plan_mod
    from transferlab.training.callbacks import Deadline
    from transferlab.training.plan import Costs

    def optimistic(*_a, **_k):  # a plan that believes 200 epochs take no time: the deadline must still hold
        return Costs({64: 1e-6}, {64: 1e-6})

    monkeypatch.setattr(planning, "measure_costs", optimistic)
    monkeypatch.setattr(plan_mod, "target_epochs", lambda n: 200.0)
    # time runs ever faster at each look at the clock (3 s at the first, 60 s at the tenth), so every epoch is
    # slower than the last and the deadline passes within a few steps on any machine, before any schedule
    # shortened at the pace so far can end; patience 200 and --mode finetune (no head to beat, so no
    # must-pay rule) leave it the only stop
    looks = []

    def fast_clock() -> float:
        looks.append(1)
        return time.time() + 3.0 * len(looks) ** 2

    monkeypatch.setattr(Deadline, "clock", staticmethod(fast_clock))
    res = train(digits_dir, tmp_path / "run", mode="finetune", ft_epochs=200, ft_patience=200, freeze_epochs=0,
                time_limit=600, image_size=64, workers=0, quiet=True, diagnose=False, recipe="single")
    assert res.metrics["plan"]["epochs"] == 200
    assert res.metrics["stopped_by_time"] is True
    assert res.metrics["finetune"]["epochs_run"] < 200 and not res.metrics["finetune"]["stopped_unpaid"]
    assert any("stopped by the time limit" in w for w in res.warnings)
    assert res.metrics["test"]["accuracy"] is not None
    assert load_model(res.model_dir).classes == [str(i) for i in range(10)]


@pytest.mark.slow
def test_simple_cnn_from_scratch_and_compare_table(digits_dir, tmp_path):
    from transferlab.compare import compare

    rows = compare(digits_dir, ["simple_cnn", "efficientnet_lite0", "resnet50"], tmp_path / "cmp", mode="auto",
                   ft_epochs=1, image_size=64, workers=0, quiet=True, diagnose=False)
    by = {r["backbone"]: r for r in rows}
    assert by["simple_cnn"]["status"] == "ok" and by["efficientnet_lite0"]["status"] == "ok"
    assert by["resnet50"]["status"] == "skipped" and "no pretrained weights" in by["resnet50"]["reason"]
    csv_text = (tmp_path / "cmp" / "compare.csv").read_text()
    assert "simple_cnn" in csv_text and "efficientnet_lite0" in csv_text and "p_vs_best" in csv_text
    ok = [by["simple_cnn"], by["efficientnet_lite0"]]
    assert sorted(r["p_vs_best"] is None for r in ok) == [False, True]  # the best has none; the other a p-value
    assert all(0 <= r["p_vs_best"] <= 1 for r in ok if r["p_vs_best"] is not None)
    assert "data:image/png;base64" in (tmp_path / "cmp" / "compare.html").read_text()
    cfg = json.loads((tmp_path / "cmp" / "simple_cnn" / "model" / "config.json").read_text())
    assert cfg["backbone"]["pretrained"] is False


@pytest.mark.slow
def test_vgg16_seed_head_shape_at_250():
    bb, info = create_backbone("vgg16", pretrained=False, image_size=250)
    head = build_head(info.num_features, 5, hidden=(1024, 1024, 4096), dropout=0.5)
    with torch.no_grad():
        out = head(bb(torch.randn(1, 3, 250, 250)))
    assert info.num_features == 4096 and out.shape == (1, 5)


@pytest.mark.slow
def test_head_mode_with_cut_stage_and_aug_views(digits_dir, tmp_path):
    res = train(digits_dir, tmp_path / "cut", mode="head", cut_stage=4, aug_views=2, augment="light", quiet=True, diagnose=False,
                epochs=5, image_size=96)
    cfg = json.loads((res.model_dir / "config.json").read_text())
    assert cfg["backbone"]["cut_stage"] == 4 and cfg["head"]["in_features"] == 112
    assert res.metrics["timing"]["features_computed"] == 200 + 2 * res.metrics["n_images"]["train"]
    again = train(digits_dir, tmp_path / "cut2", mode="head", cut_stage=4, aug_views=2, augment="light",
                  quiet=True, epochs=5, image_size=96)
    assert again.metrics["timing"]["features_computed"] == 0


@pytest.mark.slow
def test_lr_find_writes_plot(digits_dir, tmp_path, capsys):
    from transferlab.cli import main

    assert main(["lr-find", str(digits_dir), "--out", str(tmp_path), "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["suggestion"] is None or 1e-6 <= res["suggestion"] <= 1.0
    assert (tmp_path / "lr_find.png").stat().st_size > 1000


def test_time_limit_parsing():
    from transferlab.cli import parse_duration

    assert parse_duration("15m") == 900 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    import typer

    with pytest.raises(typer.BadParameter):
        parse_duration("soon")


@pytest.mark.slow
def test_the_time_limit_counts_from_the_process_start_imports_included():
    code = ("import time; time.sleep(1.0); t = time.time(); from transferlab.cli.common import process_started_at; "
            "print(t - process_started_at())")
    waited = float(subprocess.check_output([sys.executable, "-c", code], text=True))
    # on Linux the second slept before the clock was read counts (elsewhere the clock starts at the import)
    assert (1.0 if sys.platform.startswith("linux") else 0.0) <= waited < 120


@pytest.mark.slow
def test_stride4_stages_stay_frozen_in_finetuning():
    import timm

    from transferlab.training.callbacks import StageUnfreeze
    from transferlab.training.finetune import backbone_stages, early_stages

    bb, _ = create_backbone("efficientnet_lite0", pretrained=False)
    stages = backbone_stages(bb)
    assert early_stages(bb, stages, 224) == 3  # stem (/2), blocks.0 (/2), blocks.1 (/4); blocks.2 is /8
    assert early_stages(bb, stages, 96) == 3  # a stride, not a size
    assert early_stages(bb, stages, 224, max_stride=2) == 2
    assert early_stages(bb, stages, 224, max_stride=0) == 0
    resnet = timm.create_model("resnet18", pretrained=False)
    assert early_stages(resnet, backbone_stages(resnet), 224) == 2  # stem and layer1, as Detectron2 freezes
    cb = StageUnfreeze(stages, [[] for _ in stages], freeze_epochs=1, unfreeze="all", always_frozen=3)
    assert cb.trainable_stages(0) == set() and cb.trainable_stages(1) == set(range(3, len(stages)))
    cb._apply(1)
    assert not any(p.requires_grad for s in stages[:3] for p in s)
    assert all(p.requires_grad for s in stages[3:] for p in s)


def test_deadline_follows_rank_zero_so_ranks_never_disagree():
    """Under DDP a rank whose own clock says stop (or go on) does what rank 0 decided: a rank that stopped
    alone would leave the other waiting in a collective forever."""
    import time as _time

    from transferlab.training.callbacks import Deadline

    class Strategy:
        def __init__(self, root: bool) -> None:
            self.root, self.calls = root, 0

        def broadcast(self, obj, src=0):
            self.calls += 1
            return self.root

    class Trainer:
        def __init__(self, world_size: int, root: bool) -> None:
            self.world_size, self.should_stop, self.strategy = world_size, False, Strategy(root)

    late = Trainer(2, root=False)  # this rank is past the deadline, rank 0 is not
    Deadline(_time.time() - 1)._check(late)
    assert late.should_stop is False and late.strategy.calls == 1
    early = Trainer(2, root=True)  # rank 0 says stop, this rank's clock says go on
    Deadline(_time.time() + 1000)._check(early)
    assert early.should_stop is True
    alone = Trainer(1, root=False)  # one process: its own clock, no collective
    Deadline(_time.time() - 1)._check(alone)
    assert alone.should_stop is True and alone.strategy.calls == 0


def test_a_batch_whose_every_file_fails_to_decode_is_skipped(digits_dir, tmp_path):
    """Files can vanish or break after the scan: a fine-tuning batch with no readable file is skipped."""
    from transferlab.backbones import create_backbone
    from transferlab.backbones.models import Classifier, build_head
    from transferlab.training.callbacks import History
    from transferlab.training.finetune import FinetuneConfig, fit_finetune

    bb, info = create_backbone("simple_cnn", pretrained=False, image_size=32)
    model = Classifier(bb, build_head(info.num_features, 2), info.preprocessing)
    good = [str(sorted((digits_dir / c).iterdir())[0]) for c in ("0", "1")]
    bad = []
    for i in range(6):
        p = tmp_path / f"gone_{i}.png"
        p.write_text("no longer an image")
        bad.append(str(p))
    paths, labels = good + bad, [0, 1] + [i % 2 for i in range(6)]  # 4 batches of 2: at least 2 all bad
    cfg = FinetuneConfig(epochs=1, freeze_epochs=0, batch_size=2, workers=0, quiet=True, ema=False, patience=5)
    res = fit_finetune(model, paths, labels, good, [0, 1], cfg, tmp_path / "run", History(None, "finetune"),
                       pretrained=False)
    assert res.epochs_run == 1 and res.validations


@pytest.mark.slow
def test_finetuning_without_validation_images_selects_on_the_training_loss(digits_dir, tmp_path):
    """The data module gives the Trainer no validation loader when there are no validation images: the run
    trains, monitors its training loss and keeps its weights."""
    from transferlab.backbones.models import Classifier
    from transferlab.training.callbacks import History
    from transferlab.training.datamodule import FinetuneData
    from transferlab.training.finetune import FinetuneConfig, fit_finetune

    bb, info = create_backbone("simple_cnn", pretrained=False, image_size=32)
    model = Classifier(bb, build_head(info.num_features, 2), info.preprocessing)
    paths = [str(p) for c in ("0", "1") for p in sorted((digits_dir / c).iterdir())[:8]]
    labels = [0] * 8 + [1] * 8
    data = FinetuneData(info.preprocessing, paths, labels, [], [], batch_size=4, augment="light", seed=0, workers=0)
    assert not data.has_val and data.train_batches() == 4 and data.val_dataloader() == []
    before = [p.detach().clone() for p in model.parameters()]
    cfg = FinetuneConfig(epochs=2, freeze_epochs=0, batch_size=4, workers=0, quiet=True, ema=False)
    res = fit_finetune(model, paths, labels, [], [], cfg, tmp_path / "run", History(None, "finetune"), pretrained=False)
    assert res.epochs_run == 2 and res.validations == []
    assert any(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))


def test_early_stopping_counts_from_the_peak_of_the_rate():
    """Validation loss that rises while the rate warms up does not stop a fine-tuning: AnnealingStop ignores
    the validations before the schedule's peak (they neither count nor set the best); after it, patience runs
    out on three validations without gain, as Lightning's EarlyStopping would from the start."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from transferlab.training.callbacks import AnnealingStop
    from transferlab.training.module import WarmupCosine

    losses = [1.0, 2.0, 3.0, 4.0, 3.9, 3.8, 3.9, 3.9, 3.9] + [3.9] * 10  # warm-up, annealing, a plateau

    class Scripted(L.LightningModule):
        def __init__(self, warmup: int) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.passes, self.warmup = 0, warmup

        def training_step(self, batch, _):
            return (self.w * batch[0]).sum()

        def validation_step(self, batch, _):
            self.log("val_cal_loss", losses[self.passes])

        def on_validation_epoch_end(self) -> None:
            self.passes += 1

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(len(losses), self.warmup))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def epochs(stop, warmup: int = 4) -> int:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)), batch_size=1)
        trainer = L.Trainer(max_epochs=len(losses), callbacks=[stop], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            accelerator="cpu", devices=1)
        trainer.fit(Scripted(warmup), data, data)
        return trainer.current_epoch

    assert epochs(EarlyStopping("val_cal_loss", patience=3)) == 4  # stopped at the peak of the warm-up
    annealing = AnnealingStop("val_cal_loss", patience=3)  # one step an epoch: counts from the 4th on
    assert epochs(annealing) == 9 and annealing.stopped  # best 3.8 (6th), then 3 passes without gain
    never = AnnealingStop("val_cal_loss", patience=3)  # the peak at the last step: only the last pass counts
    assert epochs(never, warmup=len(losses) - 1) == len(losses) and not never.stopped


def _fit_on_a_fake_clock(anneal: bool, module=None, deadline_s: float = 55.0, step_s=lambda step: 10.0,
                         batches: int = 1):
    """A 10-epoch fit of ``batches`` steps an epoch under a :class:`Deadline` at ``deadline_s`` fake seconds,
    each step taking ``step_s(step)`` of them; the module's one-cycle schedule is 10 epochs (3 of warm-up)."""
    import lightning as L

    from transferlab.training.callbacks import AnnealByDeadline, Deadline
    from transferlab.training.module import WarmupCosine

    clock = [1000.0]

    class Slow(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.schedule = WarmupCosine(10 * batches, 3 * batches)
            self.lrs: list[float] = []

        def training_step(self, batch, _):
            self.tick()
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return (self.w * batch[0]).sum()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    deadline = Deadline(1000.0 + deadline_s, eval_factor=0.0, margin_s=0.0)
    deadline.clock = lambda: clock[0]
    callbacks = [deadline, *([AnnealByDeadline(deadline)] if anneal else [])]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(batches, 1)), batch_size=1)
    trainer = L.Trainer(max_epochs=10, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    module = module or Slow()
    module.tick = lambda: clock.__setitem__(0, clock[0] + step_s(len(module.lrs)))  # this fit's clock
    trainer.fit(module, data)
    return trainer, module, deadline, callbacks[-1]


def test_the_schedule_shortens_to_anneal_before_the_deadline():
    """Epochs slower than planned: after the first, the one-cycle schedule is shortened to the whole epochs
    that fit before the deadline, so training ends on the schedule's last step at its floor rate instead of
    being cut mid-way at a high one; without the shortening the deadline cuts it."""
    trainer, module, deadline, fitted = _fit_on_a_fake_clock(anneal=True)
    # after epoch 1 (10 s): 45 s left, 4 more epochs fit; the 5-step schedule keeps its warm-up share
    assert fitted.shortened_to == 5 and module.schedule.total_steps == 5 and trainer.current_epoch == 5
    assert not deadline.triggered and len(module.lrs) == 5 and module.lrs[-1] < 0.3  # the last step of its decay
    # resumed with its schedule shortened (as LambdaLR's checkpoint restores it): its epochs end with it,
    # unless the resumed run's own limit fits the planned schedule again
    trainer, again, _, fitted = _fit_on_a_fake_clock(anneal=True, module=module, deadline_s=55.0)
    assert trainer.current_epoch == 5 and len(again.lrs) == 10 and again.schedule.total_steps == 5
    trainer, again, _, fitted = _fit_on_a_fake_clock(anneal=True, module=module, deadline_s=1e6)
    assert trainer.current_epoch == 10 and again.schedule.total_steps == 10 and fitted.shortened_to is None
    trainer, module, deadline, _ = _fit_on_a_fake_clock(anneal=False)
    assert deadline.triggered and module.schedule.total_steps == 10 and len(module.lrs) == 6
    assert module.lrs[-1] > 0.6  # cut near the peak of the rate


def test_a_shortened_schedule_ends_with_the_share_of_an_epoch_that_fits():
    """Four steps an epoch of 2.5 s each, 57 s to the deadline: after the first epoch 4.7 more fit, so the
    schedule ends 4 whole epochs and 2 steps later (the last share sized with a tenth in hand), mid-epoch at
    its floor rate, before the deadline, instead of leaving 7 s of 57 unused."""
    trainer, module, deadline, fitted = _fit_on_a_fake_clock(anneal=True, deadline_s=57.0,
                                                             step_s=lambda step: 2.5, batches=4)
    assert fitted.shortened_to == 5.5 and module.schedule.total_steps == 22
    assert len(module.lrs) == 22 and not deadline.triggered and module.lrs[-1] < 0.05


def test_a_schedule_shortened_on_a_slow_first_epoch_grows_back_to_its_plan():
    """A first epoch of 40 s (the loaders starting) and 8 s after it, 120 s to the deadline: at the first
    epoch's pace only 3 epochs fit and the schedule is shortened; the next epochs' pace fits the planned 10
    again, the schedule grows back to them and ends on its own last step, before the deadline."""
    trainer, module, deadline, fitted = _fit_on_a_fake_clock(
        anneal=True, deadline_s=120.0, step_s=lambda step: 40.0 if step == 0 else 8.0)
    assert fitted.shortened_to is None and trainer.current_epoch == 10 and len(module.lrs) == 10
    assert module.schedule.total_steps == 10 and not deadline.triggered and module.lrs[-1] < 0.05
    # the second epoch ran on the shortened schedule: its rate sat higher in the shorter warm-up
    assert module.lrs[1] > 0.3 and module.lrs[2] < module.lrs[1] + 0.3
