"""Looking inside: Grad-CAM heat maps, galleries of top losses and of random predictions."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..backbones.models import Classifier
from ..data.images import load_image
from ..data.transforms import EvalTransform
from .plots import figure_png, plt

__all__ = ["gradcam", "overlay", "explain_image", "gallery_png"]


def gradcam(model: Classifier, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM of one uint8 image tensor (3, H, W): heat map in [0, 1] at input size, the class it
    explains (the top prediction unless ``target``), and the class probabilities."""
    model = model.eval()
    xb = x.unsqueeze(0)
    with torch.enable_grad():
        fmap = model.backbone.feature_map(model.normalize(xb)).detach().float().requires_grad_(True)
        logits = model.head(model.backbone.pool(fmap).float())
        probs = logits.softmax(-1)[0].detach().numpy()
        k = int(logits.argmax(-1)) if target is None else int(target)
        logits[0, k].backward()
    weights = fmap.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach().numpy()
    cam = cam - cam.min()
    if cam.max() > 0:
        cam = cam / cam.max()
    return cam, k, probs


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map (jet colour map) over an RGB uint8 image of the same size."""
    heat = (plt.get_cmap("jet")(cam)[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


def explain_image(model: Classifier, path: str, target: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM overlay (RGB uint8) for an image file, decoded exactly as for prediction, with the
    explained class (the top prediction unless ``target``) and the probabilities."""
    transform = EvalTransform(model.preprocessing)
    x = transform(load_image(path, draft=transform.draft))
    cam, k, probs = gradcam(model, x, target)
    return overlay(x.permute(1, 2, 0).numpy(), cam), k, probs


def gallery_png(items: Sequence[tuple[np.ndarray, str, bool]], cols: int = 4, title: str | None = None) -> bytes:
    """A grid of RGB images with captions, green when right and red when wrong."""
    n = max(1, len(items))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption, right) in zip(axes.flat, items):
        ax.imshow(img)
        ax.set_title(caption, fontsize=8, color="#1a7f37" if right else "#cf222e")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def load_display(path: str, size: int) -> np.ndarray:
    """An image file as a square RGB thumbnail for galleries (never raises: grey on failure)."""
    try:
        img = load_image(path, draft=size)
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img)
    except Exception:
        return np.full((size, size, 3), 128, dtype=np.uint8)
