"""The feature cache and streaming extraction of frozen-backbone features."""

from .cache import CacheNamespace, FeatureCache, NamespaceInfo, default_cache_dir
from .extract import Extraction, FeatureExtractor, default_workers

__all__ = ["CacheNamespace", "FeatureCache", "NamespaceInfo", "default_cache_dir", "Extraction",
           "FeatureExtractor", "default_workers"]
