"""The model artifact: a directory with ``model.safetensors`` (weights only) and ``config.json``.

No pickle anywhere: loading a stranger's artifact cannot run code. Loading checks the format version,
the file digest and every tensor's name and shape, and fails with an :class:`ArtifactError` that says
what is wrong. Saving writes a new directory beside the old one and swaps it in, so a crash while
saving leaves the previous model loadable.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file

from ._io import file_digest, fsync_path, umask_mode, write_json
from .backbones.models import Classifier, build_head, create_backbone, stage_count
from .data.transforms import Preprocessing
from .errors import ArtifactError, TransferlabError

__all__ = ["FORMAT", "FORMAT_VERSION", "Artifact", "open_artifact", "save_artifact", "load_artifact", "build_classifier",
           "load_openset", "model_summary", "package_versions"]

FORMAT = "transferlab-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPENSET = "openset.safetensors"


@dataclass(frozen=True)
class Artifact:
    """A model directory on disk and its checked ``config.json`` (no weights loaded yet)."""

    root: Path
    config: dict[str, Any]

    def file(self, name: str) -> Path:
        """A file inside the artifact's directory (``model.onnx``, ``openset.safetensors``, ...)."""
        return self.root / name


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a model's behaviour."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("transferlab", "torch", "timm", "lightning", "safetensors", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def save_artifact(directory: str | os.PathLike[str], model: Classifier, config: dict[str, Any],
                  openset: Any | None = None) -> Path:
    """Write ``model`` and ``config`` as an artifact at ``directory`` (replacing one that is there).

    ``config`` must hold ``classes``, ``backbone``, ``preprocessing`` and ``head``; the format fields,
    weights digest and package versions are added here. ``openset``: a calibrated
    :class:`~transferlab.training.openset.KnnDistance`, written as ``openset.safetensors`` with its
    record and digest in ``config["openset"]``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.chmod(tmp, umask_mode(directory=True))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        os.chmod(tmp / WEIGHTS, umask_mode())  # safetensors writes 0600
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **config,
                "weights_sha256": file_digest(tmp / WEIGHTS), "versions": package_versions()}
        full.pop("openset", None)
        if openset is not None:
            save_numpy({k: v for k, v in openset.to_tensors().items()}, str(tmp / OPENSET))
            os.chmod(tmp / OPENSET, umask_mode())
            full["openset"] = {**openset.record(), "sha256": file_digest(tmp / OPENSET)}
        write_json(tmp / CONFIG, full)
        pause = float(os.environ.get("TRANSFERLAB_FAULT_SAVE_PAUSE_S", "0") or 0)
        if pause:  # fault injection for the crash-while-saving test: a kill now must leave the old model
            import time

            time.sleep(pause)
        for path in [p for p in (tmp / WEIGHTS, tmp / OPENSET) if p.exists()] + [tmp / CONFIG, tmp]:  # on disk first
            fsync_path(path)
        previous = directory.with_name(directory.name + ".previous")
        if directory.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(directory, previous)
        os.replace(tmp, directory)
        fsync_path(directory.parent)  # the renames themselves are durable before the old model goes
        if previous.exists():
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _locate(path: Path) -> Path:
    if path.is_dir():
        return path
    previous = path.with_name(path.name + ".previous")
    if previous.is_dir():  # a save was interrupted between its two renames
        return previous
    if path.is_file() and path.name == CONFIG:
        return path.parent
    raise ArtifactError(f"no model at '{path}': expected a directory with {WEIGHTS} and {CONFIG} "
                        "(the model/ folder of a run directory).")


def open_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Find the artifact at ``path`` (its directory or its ``config.json``) and read and check its config
    (format, version, bounds)."""
    root = _locate(Path(path))
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"'{root}' has no {CONFIG}; it is not a transferlab model directory.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read '{cfg_path}': {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ArtifactError(f"'{cfg_path}' is not a transferlab model config (format {cfg.get('format') if isinstance(cfg, dict) else None!r}).")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"model format version {version!r} in '{cfg_path}' is not supported; this "
                            f"transferlab reads version {FORMAT_VERSION}. Re-export the model or upgrade transferlab.")
    for key in ("classes", "backbone", "preprocessing", "head"):
        if key not in cfg:
            raise ArtifactError(f"'{cfg_path}' lacks the '{key}' entry.")
    _check_bounds(cfg, cfg_path)
    return Artifact(root, cfg)


#: Bounds on the numbers of a config.json from elsewhere: a head width of 10^9 is an error, not an OOM.
LIMITS = {"classes": 100_000, "width": 65_536, "size": 4_096}


def _check_bounds(cfg: dict[str, Any], cfg_path: Path) -> None:
    def bad(what: str, value: Any, limit: str) -> ArtifactError:
        return ArtifactError(f"'{cfg_path}': {what} {value!r} is not {limit}; refusing to build it.")

    def whole(value: Any, lo: int, hi: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi

    classes, head, pre = cfg["classes"], cfg["head"], cfg["preprocessing"]
    if not isinstance(classes, list) or not 1 <= len(classes) <= LIMITS["classes"] or \
            not all(isinstance(c, str) for c in classes):
        raise bad("classes", f"{type(classes).__name__} of {len(classes) if hasattr(classes, '__len__') else '?'}",
                  f"a list of 1..{LIMITS['classes']} names")
    if not isinstance(head, dict) or not whole(head.get("in_features"), 1, LIMITS["width"]):
        raise bad("head in_features", head.get("in_features") if isinstance(head, dict) else head,
                  f"a whole number in 1..{LIMITS['width']}")
    hidden = head.get("hidden", [])
    if not isinstance(hidden, list) or len(hidden) > 16 or not all(whole(h, 1, LIMITS["width"]) for h in hidden):
        raise bad("head hidden widths", hidden, f"at most 16 whole numbers in 1..{LIMITS['width']}")
    if not isinstance(pre, dict) or not whole(pre.get("size"), 1, LIMITS["size"]):
        raise bad("preprocessing size", pre.get("size") if isinstance(pre, dict) else pre,
                  f"a whole number in 1..{LIMITS['size']}")


def load_artifact(path: str | os.PathLike[str]) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier of an artifact (no pretrained weights or training data needed) and return
    it with the artifact's config."""
    artifact = open_artifact(path)
    return build_classifier(artifact), artifact.config


def build_classifier(artifact: Artifact) -> Classifier:
    """The classifier an opened artifact describes, with its weights checked against the digest."""
    cfg, root = artifact.config, artifact.root
    weights = artifact.file(WEIGHTS)
    if not weights.is_file():
        raise ArtifactError(f"'{root}' has no {WEIGHTS}; the model weights are missing.")
    expected = cfg.get("weights_sha256")
    if expected and file_digest(weights) != expected:
        raise ArtifactError(f"'{weights}' does not match the digest in {CONFIG}: the file was changed or damaged.")
    bb, head_cfg = cfg["backbone"], cfg["head"]
    pre = Preprocessing.from_dict(cfg["preprocessing"])
    try:
        backbone, _ = create_backbone(bb.get("timm_name") or bb["name"], pretrained=False,
                                      cut_stage=bb.get("cut_stage"), image_size=pre.size)
        head = build_head(int(head_cfg["in_features"]), len(cfg["classes"]), head_cfg.get("hidden", []),
                          float(head_cfg.get("dropout", 0.0)), normalize=bool(head_cfg.get("normalize", False)))
    except TransferlabError as exc:
        raise ArtifactError(f"cannot rebuild the architecture of '{root}': {exc}") from None
    model = Classifier(backbone, head, pre)
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ArtifactError(f"cannot read '{weights}': {exc}") from None
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in target
             if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("tensor(s) of the wrong shape: " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"missing tensor(s): {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {', '.join(unexpected[:3])}")
        raise ArtifactError(f"'{weights}' does not fit the architecture in {CONFIG}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.eval()


def load_openset(artifact: Artifact):
    """The open-set scorer of an artifact (``None`` when it has none), its file checked against the digest."""
    from .training.openset import KnnDistance

    record = artifact.config.get("openset")
    if not record:
        return None
    path = artifact.file(OPENSET)
    if not path.is_file() or file_digest(path) != record.get("sha256"):
        raise ArtifactError(f"'{path}' is missing or does not match the digest in {CONFIG}.")
    return KnnDistance.from_parts(load_numpy(str(path)), record)


def model_summary(model: str | os.PathLike[str]) -> dict[str, Any]:
    """Backbone, stages, parameters (total and trainable when fine-tuned), input size, classes, training."""
    net, cfg = load_artifact(model)
    total = sum(p.numel() for p in net.parameters())
    head = sum(p.numel() for p in net.head.parameters())
    training = cfg.get("training", {})
    mode = training.get("mode")
    trainable = head if mode == "head" else total
    bb = cfg["backbone"]
    return {"backbone": bb.get("name"), "timm_model": bb.get("timm_name"), "pretrained": bb.get("pretrained"),
            "weights": f"{bb.get('weights_origin')} {bb.get('weights_digest')}",
            "stages": stage_count(net.backbone.model), "cut_stage": bb.get("cut_stage"),
            "layers": sum(1 for m in net.modules() if not list(m.children())),
            "parameters_total": total, "parameters_trainable": trainable, "head": cfg["head"],
            "input_size": cfg["preprocessing"]["size"], "preprocessing": cfg["preprocessing"],
            "classes": cfg["classes"], "calibration": cfg.get("calibration"), "mode": mode,
            "training": {k: v for k, v in training.items() if k != "config"}, "metrics": cfg.get("metrics"),
            "versions": cfg.get("versions")}
