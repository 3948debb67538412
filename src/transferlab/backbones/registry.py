"""The backbone registry: short aliases over timm's model names, and what is known about each.

Any timm model name is a backbone; the aliases below are the common ones, listed by
``transferlab backbones``. Per-backbone facts are data, not code.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm

from ..errors import ConfigError

__all__ = ["BackboneSpec", "ALIASES", "IMAGENET_TOP1", "resolve_name", "known_backbones", "SIMPLE_CNN"]

#: The from-scratch baseline (not a timm model).
SIMPLE_CNN = "simple_cnn"

#: Short name -> timm model name.
ALIASES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "vgg16": "vgg16.tv_in1k",
    "vgg19": "vgg19.tv_in1k",
    "inception_v3": "inception_v3.tv_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "resnet50": "resnet50.tv_in1k",
    "mobilenetv3_large_100": "mobilenetv3_large_100.ra_in1k",
    "convnext_tiny": "convnext_tiny.fb_in1k",
}

#: ImageNet-1k top-1 (%) as timm's results/results-imagenet.csv reports it for the weights used
#: (None where that table was not checked).
IMAGENET_TOP1: dict[str, float] = {
    "tf_efficientnet_lite0": 74.830,
    "tf_efficientnet_lite1": 76.644,
    "tf_efficientnet_lite2": 77.464,
    "vgg16.tv_in1k": 71.592,
    "vgg19.tv_in1k": 72.378,
    "inception_v3.tv_in1k": 77.434,
    "efficientnet_b0.ra_in1k": 77.694,
    "resnet50.tv_in1k": 76.130,
    "mobilenetv3_large_100.ra_in1k": 75.766,
}


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone name: what the user typed and the timm model it means."""

    name: str
    timm_name: str

    @property
    def architecture(self) -> str:
        """The timm architecture without the pretrained tag (``vgg16`` for ``vgg16.tv_in1k``)."""
        return self.timm_name.split(".")[0]


def resolve_name(name: str) -> BackboneSpec:
    """Map an alias or a timm model name to a :class:`BackboneSpec`.

    Raises:
        ConfigError: the name is neither an alias nor a timm model, with close matches suggested.
    """
    if name == SIMPLE_CNN:
        return BackboneSpec(name, SIMPLE_CNN)
    if name in ALIASES:
        return BackboneSpec(name, ALIASES[name])
    arch = name.split(".")[0]
    if timm.is_model(arch):
        return BackboneSpec(name, name)
    close = sorted(set(timm.list_models(f"*{arch[:6]}*")))[:8]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(f"unknown backbone {name!r}: not an alias ({', '.join(ALIASES)}) nor a timm "
                      f"model name.{hint} Run `transferlab backbones` for the list.")


def known_backbones() -> list[BackboneSpec]:
    """The aliased backbones, in display order."""
    return [BackboneSpec(k, v) for k, v in ALIASES.items()]
