"""``transferlab add-class`` and ``remove-class``: change a model's classes in seconds, without fine-tuning.

* A nearest-prototype model (``--mode knn``) gains a class as one new row of its head: the mean of the
  new images' standardised features. Nothing else changes.
* A linear-head model is refitted as the probe on the cached features of its own training split (read
  from the run's ``split.csv``) plus the new class's images (a fifth of them held out for validation
  when there are five or more), through the model's own backbone.
* Removing a class drops its row: the other classes keep their relative scores.

The model directory is changed in place; the previous model is kept beside it as
``<model>.bak-<date>-<time>``. Test metrics from before are no longer those of the model, so they are
cleared and the validation accuracy recomputed where a validation split exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifacts import load_artifact, save_artifact
from .backbones.models import BackboneInfo, Classifier
from .data.images import is_image_path
from .data.labels import check_label
from .data.split import read_split_csv
from .data.transforms import Preprocessing
from .errors import ArtifactError, ConfigError, DataError
from .features.cache import FeatureCache
from .features.extract import FeatureExtractor
from .predict import expand_paths
from .training.head import HeadConfig, fit_probe
from .training.prototypes import prototype_row, unit_rows

__all__ = ["ClassChange", "add_class", "remove_class"]

log = logging.getLogger("transferlab")

#: Keys ``save_artifact`` writes itself: not copied from the old config.
_OWN_KEYS = ("format", "format_version", "weights_sha256", "versions")


@dataclass
class ClassChange:
    """What changed: the classes now, the backup of the previous model, and the new validation accuracy."""

    model_dir: Path
    classes: list[str]
    backup: Path
    how: str
    val_accuracy: float | None = None
    seconds: float = 0.0


def _info(cfg: dict[str, Any]) -> BackboneInfo:
    """The backbone record of an artifact; a fine-tuned backbone gets its own cache identity."""
    bb = cfg["backbone"]
    digest = bb.get("weights_digest", "")
    if (cfg.get("training") or {}).get("finetune_epochs"):
        digest = "artifact-" + str(cfg.get("weights_sha256", ""))[:16]
    return BackboneInfo(bb["name"], bb.get("timm_name") or bb["name"], Preprocessing.from_dict(cfg["preprocessing"]),
                        bool(bb.get("pretrained", True)), bb.get("weights_origin", ""), digest, bb.get("cut_stage"),
                        int(cfg["head"]["in_features"]), int(bb.get("stages", 0)))


def _features(model: Classifier, cfg: dict[str, Any], paths: list[str], quiet: bool) -> tuple[np.ndarray, list[str]]:
    ext = FeatureExtractor(model.backbone, _info(cfg), quiet=quiet).extract(paths, FeatureCache())
    return ext.features[ext.ok], [p for p, ok in zip(paths, ext.ok) if ok]


def _backup(model_dir: Path) -> Path:
    backup = model_dir.with_name(f"{model_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    k = 1
    while backup.exists():
        backup = model_dir.with_name(f"{model_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{k}")
        k += 1
    shutil.copytree(model_dir, backup)
    return backup


def _set_last_layer(model: Classifier, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor) -> None:
    last = model.head[-1]
    layer = nn.Linear(last.in_features, len(bias))
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    model.head[-1] = layer


def _save(model_dir: Path, model: Classifier, cfg: dict[str, Any], classes: list[str], note: str,
          val_accuracy: float | None) -> None:
    new = {k: v for k, v in cfg.items() if k not in _OWN_KEYS}
    new["classes"] = classes
    new["metrics"] = {"test_accuracy": None, "test_macro_f1": None, "val_accuracy": val_accuracy, "note": note}
    save_artifact(model_dir, model.cpu(), new)


def _image_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"no such folder: '{folder}'. Give a folder of images of the new class.")
    files = [str(Path(p).resolve()) for p in expand_paths([folder]) if is_image_path(p)]
    if not files:
        raise DataError(f"'{folder}' holds no image files (JPEG, PNG, GIF, BMP, WebP, TIFF).")
    return files


def _single_label(cfg: dict, what: str) -> None:
    if cfg.get("task") == "multilabel":
        raise ConfigError(f"{what} changes single-label models; this one is multi-label (its images can carry "
                          "any labels, so a new label needs every image re-labelled): train it again.")


def add_class(model_dir: str | os.PathLike[str], folder: str | os.PathLike[str], name: str | None = None, *,
              seed: int = 0, quiet: bool = False) -> ClassChange:
    """Add the images in ``folder`` as a new class ``name`` (default: the folder's name) to the model.

    Raises:
        ConfigError: the class exists, or the model's head cannot take a class this way (an MLP head).
        DataError: no readable image in ``folder``. ArtifactError: a linear-head model without its split.
    """
    t0 = time.perf_counter()
    model_dir, folder = Path(model_dir), Path(folder)
    model, cfg = load_artifact(model_dir)
    _single_label(cfg, "add-class")
    classes = list(cfg["classes"])
    name = check_label(name or folder.name, f"the new class of {model_dir}")
    if name in classes:
        raise ConfigError(f"'{name}' is already a class of this model ({', '.join(classes)}).")
    kind = cfg["head"].get("kind", "mlp" if cfg["head"].get("hidden") else "linear")
    feats, used = _features(model, cfg, _image_files(folder), quiet)
    if not len(used):
        raise DataError(f"no image in '{folder}' could be read.")
    if kind == "prototypes":
        std = model.head[0]
        w, b = prototype_row(unit_rows(feats, std.mean.numpy(), float(std.scale)), float(cfg["head"]["scale"]))
        last = model.head[-1]
        _set_last_layer(model, np.vstack([last.weight.detach().numpy(), w[None]]),
                        np.append(last.bias.detach().numpy(), b))
        how, val_acc = f"prototype of {len(used)} image(s)", None
    elif kind == "linear":
        val_acc, how = _refit_linear(model, cfg, classes, feats, seed, quiet)
    else:
        raise ConfigError(f"add-class works on --mode knn and linear-head models; this one has an MLP head "
                          f"({cfg['head'].get('hidden')}): train again with the new class folder.")
    backup = _backup(model_dir)
    _save(model_dir, model, cfg, classes + [name], f"class '{name}' added by add-class ({how})", val_acc)
    return ClassChange(model_dir, classes + [name], backup, how, val_acc, time.perf_counter() - t0)


def _refit_linear(model: Classifier, cfg: dict[str, Any], classes: list[str], new_feats: np.ndarray, seed: int,
                  quiet: bool) -> tuple[float | None, str]:
    """Refit a linear head as the probe on the old training split's features plus the new class's."""
    split_csv = Path((cfg.get("training") or {}).get("split_csv") or "")
    if not split_csv.is_file():
        raise ArtifactError(f"add-class refits a linear head on the model's training split, but its split.csv "
                            f"('{split_csv}') is gone; train again, or use a --mode knn model.")
    old = [s for s in read_split_csv(split_csv) if s.split in ("train", "val") and s.label in classes]
    feats, used = _features(model, cfg, [s.path for s in old], quiet)
    by_path = {s.path: s for s in old}
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[by_path[p].label] for p in used])
    is_val = np.array([by_path[p].split == "val" for p in used])
    rng = np.random.default_rng(seed)
    n_new = len(new_feats)
    new_val = np.zeros(n_new, bool)
    if n_new >= 5:
        new_val[rng.permutation(n_new)[: max(1, n_new // 5)]] = True
    x_all = np.vstack([feats, new_feats])
    y_all = np.concatenate([y, np.full(n_new, len(classes))])
    v_all = np.concatenate([is_val, new_val])
    res = fit_probe(x_all[~v_all], y_all[~v_all], x_all[v_all], y_all[v_all], len(classes) + 1,
                    HeadConfig(seed=seed, quiet=quiet))
    model.head = res.head
    val_acc = None
    if v_all.any():
        with torch.inference_mode():
            pred = res.head(torch.from_numpy(x_all[v_all]).float()).argmax(1).numpy()
        val_acc = float(np.mean(pred == y_all[v_all]))
    return val_acc, (f"linear head refitted on {int((~v_all).sum())} training image(s) "
                     f"({int((~new_val).sum())} of the new class), C={res.c:g}")


def remove_class(model_dir: str | os.PathLike[str], name: str) -> ClassChange:
    """Remove class ``name`` from the model (its row of the last layer); at least two classes remain."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    model, cfg = load_artifact(model_dir)
    _single_label(cfg, "remove-class")
    classes = list(cfg["classes"])
    if name not in classes:
        raise ConfigError(f"'{name}' is not a class of this model ({', '.join(classes)}).")
    if len(classes) <= 2:
        raise ConfigError("a model needs at least two classes; this one would be left with one.")
    keep = [i for i, c in enumerate(classes) if c != name]
    last = model.head[-1]
    _set_last_layer(model, last.weight.detach()[keep], last.bias.detach()[keep])
    backup = _backup(model_dir)
    rest = [classes[i] for i in keep]
    _save(model_dir, model, cfg, rest, f"class '{name}' removed by remove-class", None)
    return ClassChange(model_dir, rest, backup, "row removed", None, time.perf_counter() - t0)
