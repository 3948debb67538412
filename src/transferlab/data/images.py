"""Decoding one image file into an RGB picture, with validation.

Everything that reads pixels from disk goes through :func:`decode`, so that training, evaluation,
prediction and the audit see exactly the same picture: EXIF orientation applied, any mode (grayscale,
palette, RGBA, CMYK, 16-bit) converted to 8-bit RGB, transparency composited over white.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageInfo", "decode", "load_image", "is_image_path", "to_rgb"]

#: File extensions read as images (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Truncated files must fail loudly, never decode as half-grey pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class ImageInfo:
    """What was found while decoding: original size, mode and the conversions applied."""

    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    frames: int = 1
    conversions: list[str] = field(default_factory=list)


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the file's extension (any case) is one transferlab reads."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode(path: str | os.PathLike[str], draft: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode ``path`` to an 8-bit RGB image and report what was converted.

    Args:
        path: the image file.
        draft: when given, JPEGs are decoded at a reduced scale whose shorter side is still at least
            ``draft`` pixels (DCT scaling, several times faster on large photos). Default ``None``.

    Raises:
        ImageError: the file is missing, empty, not an image, truncated, corrupt or too large.
    """
    path = str(path)
    info = ImageInfo()
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                info.width, info.height = img.size
                info.mode, info.format = img.mode, img.format or ""
                info.frames = int(getattr(img, "n_frames", 1) or 1)
                if draft and img.format == "JPEG":
                    img.draft("RGB", (draft, draft))
                img.load()
                out = _orient(img, info)
                out = to_rgb(out, info)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"image too large (decompression bomb guard): {exc}") from None
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg:
            raise ImageError(path, f"truncated image: {msg}") from None
        raise ImageError(path, f"corrupt image: {msg}") from None
    except Exception as exc:  # any decoder failure is a property of the file, not a crash
        raise ImageError(path, f"corrupt image: {type(exc).__name__}: {exc}") from None
    if out.width < 1 or out.height < 1:
        raise ImageError(path, "image has no pixels")
    if info.frames > 1:
        info.conversions.append(f"animated ({info.frames} frames): first frame used")
    return out, info


def load_image(path: str | os.PathLike[str], draft: int | None = None) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB PIL image (see :func:`decode`)."""
    return decode(path, draft)[0]


def _orient(img: Image.Image, info: ImageInfo) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return img
    if orientation in (None, 1):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:
        return img
    info.conversions.append(f"EXIF orientation {orientation} applied")
    return out if out is not None else img


def to_rgb(img: Image.Image, info: ImageInfo | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit scaled, transparency over white); notes go to ``info``."""
    info = info if info is not None else ImageInfo()
    mode = img.mode
    if mode == "RGB":
        return img
    info.conversions.append(f"mode {mode} converted to RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
