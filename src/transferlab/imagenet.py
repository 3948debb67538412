"""Classifying images with the pretrained network itself (ImageNet labels), before any transfer."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .backbones.models import create_imagenet_model
from .config import DEFAULT_BACKBONE
from .data.images import load_image
from .data.transforms import EvalTransform
from .errors import ImageError
from .runtime import autocast, pick_device, prepare_model, to_device_batch

__all__ = ["classify_imagenet", "imagenet_labels"]


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions, in index order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def classify_imagenet(paths: Sequence[str | os.PathLike[str]], backbone: str = DEFAULT_BACKBONE,
                      top_k: int = 5, weights_file: str | None = None, allow_download: bool | None = None,
                      device: str | None = None) -> list[dict[str, Any]]:
    """Top-k ImageNet predictions per image: ``[{"path", "predictions": [{"label", "index",
    "probability"}]}]``; an unreadable image gets ``"error"`` instead.

    Example:
        >>> classify_imagenet(["coffee.jpg"])[0]["predictions"][0]["label"]  # doctest: +SKIP
        'espresso'
    """
    model, pre = create_imagenet_model(backbone, weights_file=weights_file, allow_download=allow_download)
    dev = pick_device(device)
    model = prepare_model(model, dev)
    transform = EvalTransform(pre)
    labels = imagenet_labels()
    out: list[dict[str, Any]] = []
    for p in paths:
        try:
            x = transform(load_image(p, draft=transform.draft)).unsqueeze(0)
        except ImageError as exc:
            out.append({"path": str(p), "predictions": [], "error": exc.reason})
            continue
        with torch.inference_mode(), autocast(dev):
            probs = model(to_device_batch(x, dev)).float().softmax(-1)[0]
        values, idx = probs.topk(min(top_k, probs.numel()))
        out.append({"path": str(p), "predictions": [
            {"label": labels[i], "index": int(i), "probability": float(v)} for v, i in zip(values.tolist(), idx.tolist())]})
    return out
