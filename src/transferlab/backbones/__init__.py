"""Backbones: a registry over timm, offline weight resolution, feature extractors and heads."""

from .catalog import BackboneRow, list_backbones
from .models import (BackboneInfo, Classifier, FeatureBackbone, Normalize, SimpleCNN, build_head,
                     create_backbone, create_imagenet_model, stage_count)
from .registry import ALIASES, IMAGENET_TOP1, SIMPLE_CNN, BackboneSpec, known_backbones, resolve_name
from .weights import (LITE_PACKAGES, WeightsSource, convert_by_order, download_allowed, find_weights,
                      load_state_dict, transferlab_home, weights_dir)

__all__ = [
    "BackboneRow", "list_backbones",
    "BackboneInfo", "Classifier", "FeatureBackbone", "Normalize", "SimpleCNN", "build_head",
    "create_backbone", "create_imagenet_model", "stage_count",
    "ALIASES", "IMAGENET_TOP1", "SIMPLE_CNN", "BackboneSpec", "known_backbones", "resolve_name",
    "LITE_PACKAGES", "WeightsSource", "convert_by_order", "download_allowed", "find_weights",
    "load_state_dict", "transferlab_home", "weights_dir",
]
