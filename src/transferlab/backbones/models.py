"""Backbone networks as feature extractors, the from-scratch baseline, heads and the classifier.

A :class:`Classifier` is ``Normalize -> backbone -> head``; it takes uint8 (or 0..255 float) NCHW
pixels, so exported models and the service need no separate normalisation step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import timm
import torch
from torch import nn

from ..config import DEFAULT_BACKBONE
from ..data.transforms import Preprocessing
from ..errors import ConfigError
from .registry import SIMPLE_CNN, BackboneSpec, resolve_name
from .weights import load_state_dict, state_digest

__all__ = ["Normalize", "Standardize", "FeatureBackbone", "SimpleCNN", "Classifier", "BackboneInfo", "build_head",
           "create_backbone", "create_imagenet_model", "stage_count"]


class Normalize(nn.Module):
    """uint8 or 0..255 pixels -> float, scaled and normalised with ``mean``/``std`` (0..1 units)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class SimpleCNN(nn.Module):
    """A small CNN trained from scratch: the baseline that shows what transfer learning buys."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = w
        self.stages = nn.Sequential(*layers)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))


class FeatureBackbone(nn.Module):
    """A timm model (or the simple CNN) returning one pooled feature vector per image.

    ``cut_stage=N`` keeps only the first N feature stages and average-pools their output.
    """

    def __init__(self, model: nn.Module, cut_stage: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.cut_stage = cut_stage
        if cut_stage is not None:
            n = stage_count(model)
            if not 1 <= cut_stage <= n:
                raise ConfigError(f"cut_stage={cut_stage}: this backbone has {n} stages; use 1..{n}.")
            model.prune_intermediate_layers(indices=[cut_stage - 1], prune_head=True, prune_norm=True)
            self.num_features = int(model.feature_info[cut_stage - 1]["num_chs"])
        else:
            self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut_stage is None:
            return self.model(x)
        return self.pool(self.feature_map(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial feature map (N, C, H, W) before pooling (what Grad-CAM looks at)."""
        if self.cut_stage is not None:
            return self.model.forward_intermediates(x, indices=[self.cut_stage - 1], intermediates_only=True)[0]
        if isinstance(self.model, SimpleCNN):
            return self.model.stages(x)
        return self.model.forward_features(x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> the pooled feature vector that ``forward`` returns."""
        if self.cut_stage is not None or isinstance(self.model, SimpleCNN):
            return fmap.mean(dim=(2, 3))
        return self.model.forward_head(fmap, pre_logits=True)


def stage_count(model: nn.Module) -> int:
    """Number of feature stages timm reports for ``model`` (1 for models without feature info)."""
    info = getattr(model, "feature_info", None)
    return len(info) if info else 1


class Standardize(nn.Module):
    """Fixed centring and scaling ``(x - mean) / scale`` with statistics of the training features.

    Backbones' pooled features differ in scale by orders of magnitude (VGG's ReLU outputs against
    EfficientNet's); bringing them to unit average variance lets one learning rate suit every
    backbone. One scalar ``scale`` (the root of the mean per-feature variance) keeps the features'
    relative sizes, so a feature that is nearly constant in training cannot blow up on new images.
    The statistics are saved with the model.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(()))

    def set_stats(self, features: torch.Tensor) -> None:
        """Set mean and scale from a (n, d) feature matrix."""
        f = features.float()
        self.mean.copy_(f.mean(0))
        var = f.var(0).mean() if f.shape[0] > 1 else torch.tensor(1.0)
        self.scale.copy_(var.sqrt().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class L2Normalize(nn.Module):
    """Scale each feature vector to unit length (the nearest-prototype head's cosine geometry)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


def build_head(in_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0,
               standardize: bool = True, normalize: bool = False) -> nn.Sequential:
    """A linear head, or an MLP with ``hidden`` widths (ReLU, dropout after each hidden layer), after a
    fixed :class:`Standardize` layer (default on) and, with ``normalize``, :class:`L2Normalize`.

    Example:
        >>> build_head(1280, 10, hidden=(1024, 1024), dropout=0.5)  # doctest: +SKIP
    """
    layers: list[nn.Module] = [Standardize(in_features)] if standardize else []
    if normalize:
        layers.append(L2Normalize())
    cin = in_features
    for width in hidden:
        layers += [nn.Linear(cin, int(width)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        cin = int(width)
    if dropout > 0 and not hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """``Normalize -> FeatureBackbone -> head``: uint8 NCHW pixels in, logits out."""

    def __init__(self, backbone: FeatureBackbone, head: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.preprocessing = pre
        self.normalize = Normalize(pre.mean, pre.std)
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a uint8 batch."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class BackboneInfo:
    """What :func:`create_backbone` built: names, preprocessing, weights origin and digest."""

    name: str
    timm_name: str
    preprocessing: Preprocessing
    pretrained: bool
    weights_origin: str
    weights_digest: str
    cut_stage: int | None
    num_features: int
    stages: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the artifact's config)."""
        return {"name": self.name, "timm_name": self.timm_name, "pretrained": self.pretrained,
                "weights_origin": self.weights_origin, "weights_digest": self.weights_digest,
                "cut_stage": self.cut_stage, "num_features": self.num_features, "stages": self.stages}


def _timm_model(spec: BackboneSpec, num_classes: int | None, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(spec.timm_name, **kwargs)
    except Exception as exc:
        raise ConfigError(f"timm cannot build {spec.timm_name!r}: {exc}") from None


def create_backbone(name: str = DEFAULT_BACKBONE, *, pretrained: bool = True,
                    weights_file: str | os.PathLike[str] | None = None, allow_download: bool | None = None,
                    cut_stage: int | None = None, image_size: int | None = None) -> tuple[FeatureBackbone, BackboneInfo]:
    """Build a feature backbone with its preprocessing; pretrained weights resolved offline first.

    Args:
        name: alias (``efficientnet_lite0``) or any timm model name. Default ``efficientnet_lite0``.
        pretrained: load ImageNet weights (``False``: random init). Default ``True``.
        weights_file: an explicit weights file (safetensors, or .pth read with weights_only).
        allow_download: allow the hub when no offline source has the weights.
        cut_stage: keep only the first N feature stages.
        image_size: input size instead of the model's default.

    Example:
        >>> backbone, info = create_backbone("efficientnet_lite0")  # doctest: +SKIP
    """
    spec = resolve_name(name)
    if spec.timm_name == SIMPLE_CNN:
        if cut_stage is not None:
            raise ConfigError("cut_stage is not supported for simple_cnn.")
        model = SimpleCNN()
        pre = Preprocessing(size=int(image_size or 128), crop_pct=1.0)
        fb = FeatureBackbone(model)
        return fb, BackboneInfo(spec.name, SIMPLE_CNN, pre, False, "random", state_digest(model.state_dict()),
                                None, fb.num_features, 1)
    full = _timm_model(spec, None, image_size)
    if hasattr(full, "drop_rate"):
        full.drop_rate = 0.0  # dropout on pooled features is the head's job (--dropout), not the backbone's
    origin, digest = "random", ""
    if pretrained:
        source = load_state_dict(spec, full, weights_file=weights_file, allow_download=allow_download)
        origin, digest = source.origin, source.digest
    else:
        digest = state_digest(full.state_dict())
    cfg = dict(full.pretrained_cfg or {})
    full.reset_classifier(0)
    pre = Preprocessing.from_timm_cfg(cfg, image_size)
    stages = stage_count(full)
    fb = FeatureBackbone(full, cut_stage)
    return fb, BackboneInfo(spec.name, spec.timm_name, pre, pretrained, origin, digest, cut_stage,
                            fb.num_features, stages)


def create_imagenet_model(name: str = DEFAULT_BACKBONE, *, weights_file: str | os.PathLike[str] | None = None,
                          allow_download: bool | None = None) -> tuple[nn.Module, Preprocessing]:
    """The pretrained network with its ImageNet classifier, wrapped to take uint8 pixels."""
    spec = resolve_name(name)
    if spec.timm_name == SIMPLE_CNN:
        raise ConfigError("simple_cnn has no ImageNet weights; choose a pretrained backbone.")
    full = _timm_model(spec, None, None)
    load_state_dict(spec, full, weights_file=weights_file, allow_download=allow_download)
    pre = Preprocessing.from_timm_cfg(dict(full.pretrained_cfg or {}))
    return nn.Sequential(Normalize(pre.mean, pre.std), full).eval(), pre
