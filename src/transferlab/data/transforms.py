"""Preprocessing: the exact resize/crop of a backbone, producing uint8 CHW tensors.

Normalisation (mean/std) happens inside the network (:class:`transferlab.backbones.Normalize`), so
decoding workers ship 4x fewer bytes and exported models take plain uint8 pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

__all__ = ["Preprocessing", "EvalTransform", "to_uint8_tensor", "AUGMENT_PRESETS", "TrainTransform"]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

AUGMENT_PRESETS = ("none", "light", "strong", "orient")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the network: resize shorter side to ``size / crop_pct``, centre-crop ``size``."""

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    @property
    def resize_to(self) -> int:
        """Shorter side before the centre crop."""
        return int(math.floor(self.size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a model's ``config.json``."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["crop"] = "center"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Inverse of :meth:`to_dict`."""
        return cls(size=int(d["size"]), crop_pct=float(d["crop_pct"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=str(d.get("interpolation", "bicubic")))

    @classmethod
    def from_timm_cfg(cls, cfg: dict[str, Any], image_size: int | None = None) -> "Preprocessing":
        """Build from a timm ``pretrained_cfg``; ``image_size`` overrides the input size."""
        size = int(image_size or cfg.get("input_size", (3, 224, 224))[-1])
        interp = str(cfg.get("interpolation", "bicubic"))
        if interp not in _RESAMPLE:
            interp = "bicubic"
        return cls(size=size, crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
                   mean=tuple(float(v) for v in cfg.get("mean", cls.mean)),
                   std=tuple(float(v) for v in cfg.get("std", cls.std)), interpolation=interp)

    def key(self) -> str:
        """A short stable string naming this preprocessing (part of feature-cache keys)."""
        return (f"s{self.size}-c{self.crop_pct:g}-{self.interpolation}-m{','.join(f'{v:g}' for v in self.mean)}"
                f"-d{','.join(f'{v:g}' for v in self.std)}")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor of shape (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic resize + centre crop to a uint8 tensor (the evaluation/prediction path)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    @property
    def draft(self) -> int:
        """Shorter side asked of a reduced JPEG decode: 90% of the resize target, so that a photo whose
        1/8-scale decode falls just short (2000 px -> 250 for 256) is still decoded at 1/8 and then
        upsampled by a few percent, instead of decoded at four times the pixels."""
        return int(self.pre.resize_to * 0.9)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size, short = self.pre.size, self.pre.resize_to
        w, h = img.size
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if (nw, nh) == (w, h):
            return to_uint8_tensor(img.crop((left, top, left + size, top + size)))
        # the centre crop of the resized picture, resized straight from its box in the source: the same
        # pixels as resizing the whole picture and then cropping, without ever making the whole picture
        # (a 5 x 8,000,000 image would otherwise become 256 x 409,600,000 pixels first)
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return to_uint8_tensor(img.resize((size, size), _RESAMPLE[self.pre.interpolation], box=box, reducing_gap=3.0))


class _QuarterTurn:
    """Turns a picture by 0, 90, 180 or 270 degrees, uniformly (torch's random generator, so seeded)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        k = int(torch.randint(0, 4, ()).item())
        return img if k == 0 else img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                 Image.Transpose.ROTATE_270)[k - 1])


class TrainTransform:
    """Random augmentation for fine-tuning: ``light`` (a random crop of 75-100% of the image, resized,
    and a horizontal flip: a few epochs of fine-tuning gain from mild augmentation and lose from crops
    that cut the evidence away; BENCHMARKS.md) or ``strong`` (crops of 35-100%, RandAugment, colour
    jitter: for long runs) or ``orient`` (the light crop, then flips on both axes and turns by multiples of
    90 degrees: for pictures with no up, as in microscopy, cells or aerial views). ``none`` is the
    evaluation transform."""

    def __init__(self, pre: Preprocessing, preset: str = "light") -> None:
        if preset not in AUGMENT_PRESETS:
            raise ConfigError(f"augment preset {preset!r}: expected one of {', '.join(AUGMENT_PRESETS)}")
        self.pre, self.preset = pre, preset
        self._eval = EvalTransform(pre)
        self._ops: Callable[[Image.Image], Image.Image] | None = None
        if preset != "none":
            from torchvision.transforms import v2 as T

            interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                      "nearest": T.InterpolationMode.NEAREST,
                      "lanczos": T.InterpolationMode.LANCZOS}[pre.interpolation]
            ops: list[Any] = [
                T.RandomResizedCrop(pre.size, scale=(0.75, 1.0) if preset == "light" else (0.35, 1.0),
                                    interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
            ]
            if preset == "orient":
                ops += [T.RandomVerticalFlip(), _QuarterTurn()]
            if preset == "strong":
                ops += [T.RandAugment(num_ops=2, magnitude=9, interpolation=interp), T.ColorJitter(0.2, 0.2, 0.2, 0.02)]
            self._ops = T.Compose(ops)

    @property
    def draft(self) -> int:
        """Reduced JPEG decode size that keeps enough pixels for the random crops."""
        return self.pre.resize_to

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self._ops is None:
            return self._eval(img)
        short = self.pre.resize_to
        if min(img.size) > 2 * short:  # cheap pre-shrink of huge photos before random ops
            s = 2 * short / min(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BILINEAR,
                             reducing_gap=2.0)
        return to_uint8_tensor(self._ops(img))
