"""Benchmark inputs generated from scikit-image's sample photographs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "retina", "hubble_deep_field", "immunohistochemistry", "camera")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3]


def large_jpegs(folder: Path, n: int, size=(3000, 2000), seed: int = 0) -> list[str]:
    """``n`` phone-photo-sized JPEGs: a random crop of a sample photo, upscaled, with sensor-like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        path = folder / f"large_{i:04d}.jpg"
        out.append(str(path))
        if path.exists():
            continue
        img = _photo(PHOTOS[i % len(PHOTOS)])
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        big = np.asarray(Image.fromarray(img[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(big).save(path, quality=90)
    return out


def small_pngs(folder: Path, n: int, size: int = 128, seed: int = 0) -> list[str]:
    """``n`` small PNGs: random crops of the sample photos resized to ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [_photo(p) for p in PHOTOS]
    out = []
    for i in range(n):
        path = folder / f"small_{i:05d}.png"
        out.append(str(path))
        if path.exists():
            continue
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        c = int(min(h, w) * rng.uniform(0.3, 0.9))
        y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
        Image.fromarray(img[y:y + c, x:x + c]).resize((size, size), Image.Resampling.BILINEAR).save(path)
    return out
