"""Building the Lightning Trainer (engineering: loggers, callbacks, precision, devices)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L

__all__ = ["make_trainer", "quiet_lightning"]


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and tips (warnings still show)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*_is_dynamo_compiling.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def make_trainer(log_dir: str | os.PathLike[str] | None, *, max_epochs: int, callbacks: list[Any],
                 quiet: bool = False, version: str = "head", accelerator: str = "auto",
                 devices: int | str = 1, strategy: str = "auto", num_nodes: int = 1,
                 precision: str | None = None,
                 gradient_clip_val: float | None = None, checkpoint: bool = False,
                 deterministic: bool = True, max_steps: int = -1,
                 val_check_interval: float | None = None) -> L.Trainer:
    """A Trainer with TensorBoard logs under ``log_dir`` (``None``: no loggers). ``val_check_interval``:
    the share of an epoch between validation passes (default: once, at each epoch's end)."""
    quiet_lightning()
    if strategy == "ddp":  # frozen stages leave parameters unused in some epochs
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=True)  # type: ignore[assignment]
    loggers: list[Any] | bool = False
    if log_dir is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [TensorBoardLogger(str(Path(log_dir)), name="tensorboard", version=version,
                                     default_hp_metric=False)]
    return L.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, callbacks=callbacks,
        val_check_interval=val_check_interval, logger=loggers, enable_checkpointing=checkpoint,
        enable_progress_bar=not quiet, enable_model_summary=False, num_sanity_val_steps=0,
        accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
        precision=precision, gradient_clip_val=gradient_clip_val,
        deterministic=deterministic, log_every_n_steps=1, use_distributed_sampler=True,
    )
