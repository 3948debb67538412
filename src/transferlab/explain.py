"""``transferlab explain`` and ``transferlab summary``: what a saved model looks at, and what it is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from .artifacts import load_artifact
from .backbones.models import stage_count
from .errors import ImageError
from .evaluation.interpret import explain_image

__all__ = ["explain", "model_summary"]


def explain(model: str | os.PathLike[str], image: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the Grad-CAM overlay for ``image`` to ``out`` (PNG); returns the label and probability."""
    net, cfg = load_artifact(model)
    try:
        heat, k, probs = explain_image(net, str(image))
    except ImageError:
        raise
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(heat).save(out)
    return {"image": str(image), "label": cfg["classes"][k], "probability": float(probs[k]), "heatmap": str(out)}


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
