"""Decoding one image file into an RGB picture, with validation.

Everything that reads pixels from disk goes through :func:`decode`, so that training, evaluation,
prediction and the audit see exactly the same picture: EXIF orientation applied, any mode (grayscale,
palette, RGBA, CMYK, 16-bit) converted to 8-bit RGB, transparency composited over white.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_ASPECT", "ImageInfo", "decode", "peek_size", "load_image",
           "is_image_path", "to_rgb"]

#: File extensions read as images (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: The only formats Pillow may open (whatever the extension): raster formats with decoders inside
#: Pillow. EPS, PDF and others would hand the file to an outside program (Ghostscript). JPEG includes
#: the multi-picture JPEG (MPO) that phone cameras write.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
#: Longer side over shorter side beyond which a picture is refused: a 5 x 8,000,000 PNG is 46 KB on
#: disk, and scaling its 5 px side to a network's input would make 400 million pixels.
MAX_ASPECT = 100

# Truncated files fail loudly (Pillow's default, ``ImageFile.LOAD_TRUNCATED_IMAGES = False``); transferlab
# never sets that process-wide switch, which belongs to the program that imports it.


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


_UNSUPPORTED = "not an image in a supported format (JPEG, PNG, GIF, BMP, WebP, TIFF)"
_BOMB = "image too large (decompression bomb guard)"


def _source(source: str | os.PathLike[str] | bytes, name: str | None) -> tuple[Any, str]:
    """What Pillow opens (the path, or the bytes as a file) and what errors call it."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), name or "upload"
    return source, name or str(source)


def decode(source: str | os.PathLike[str] | bytes, draft: int | None = None, max_pixels: int | None = None,
           name: str | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode an image file (a path, or the bytes of an upload) to 8-bit RGB and report what was converted.

    Every decode path goes through here (training, prediction, export, the service), with the same
    guards: only :data:`IMAGE_FORMATS`, at most ``max_pixels`` pixels (and Pillow's own bomb guard),
    no thinner than 1:\ :data:`MAX_ASPECT`, checked on the header before any pixel is decoded.

    Args:
        source: the image file, or its bytes.
        draft: when given, JPEGs are decoded at a reduced scale whose shorter side is still at least
            ``draft`` pixels (DCT scaling, several times faster on large photos). Default ``None``.
        max_pixels: refuse images with more pixels than this. Default ``None`` (Pillow's guard only).
        name: what errors call the file (default: the path, or ``"upload"`` for bytes).

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels`` or Pillow's decompression-bomb guard.
        ImageError: the file is missing, empty, not an image of an allowed format, truncated, corrupt or
            too thin.
    """
    fp, path = _source(source, name)
    info = ImageInfo()
    try:
        if (len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)) == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                info.width, info.height = img.size
                info.mode, info.format = img.mode, img.format or ""
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLargeError(path, f"{img.width}x{img.height} pixels is over the limit of "
                                                   f"{max_pixels} pixels")
                if min(img.size) >= 1 and max(img.size) > MAX_ASPECT * min(img.size):
                    raise ImageError(path, f"aspect ratio {img.width}x{img.height} is beyond 1:{MAX_ASPECT}")
                # whether there is a second frame, without walking every frame of the file
                info.frames = 2 if getattr(img, "is_animated", False) else 1
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
        raise ImageError(path, _UNSUPPORTED) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(path, f"{_BOMB}: {exc}") from None
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
        info.conversions.append("animated: first frame used")
    return out, info


def peek_size(source: str | os.PathLike[str] | bytes, name: str | None = None) -> tuple[int, int]:
    """Width and height from the header alone (no pixel decoded), with the same format allow-list as
    :func:`decode`; raises :class:`ImageError` for anything :func:`decode` would refuse on its header."""
    fp, path = _source(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                return img.size
    except UnidentifiedImageError:
        raise ImageError(path, _UNSUPPORTED) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, f"{_BOMB}: {exc}") from None
    except Exception as exc:
        raise ImageError(path, f"corrupt image: {type(exc).__name__}: {exc}") from None


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
