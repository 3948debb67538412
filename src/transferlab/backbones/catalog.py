"""The table behind ``transferlab backbones``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
import torch

from .registry import IMAGENET_TOP1, known_backbones
from .weights import find_weights

__all__ = ["BackboneRow", "list_backbones"]


@dataclass
class BackboneRow:
    """One backbone: parameters in millions, default input size, ImageNet top-1, offline weights here."""

    name: str
    timm_name: str
    params_m: float
    input_size: int
    imagenet_top1: float | None
    offline: bool
    source: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def list_backbones(offline_only: bool = False) -> list[BackboneRow]:
    """Describe the aliased backbones; ``offline_only`` keeps those whose weights are on this machine."""
    rows = []
    for spec in known_backbones():
        found = find_weights(spec)
        if offline_only and found is None:
            continue
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        size = int((model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-1])
        rows.append(BackboneRow(spec.name, spec.timm_name, round(params, 2), size,
                                IMAGENET_TOP1.get(spec.timm_name), found is not None,
                                found.origin if found else "download"))
    return rows
