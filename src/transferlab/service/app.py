"""The HTTP service: ``POST /predict``, ``GET /health``, ``GET /labels``, the web page at ``/``.

Hostile input gets a 4xx with a JSON error body, never a 500: bodies over ``max_bytes`` (413), images
over ``max_pixels`` (413, decompression bombs), non-images and truncated images (422), a wrong content
type (415), an empty request (400).
"""

from __future__ import annotations

import io
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..data.images import to_rgb
from ..predict import load_model
from .batcher import Batcher

__all__ = ["create_app", "app_from_env", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


class HTTPProblem(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise HTTPProblem(400, f"'{name}' is empty")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise HTTPProblem(413, f"'{name}' is {img.width}x{img.height} pixels; the limit is {max_pixels} pixels")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except HTTPProblem:
        raise
    except UnidentifiedImageError:
        raise HTTPProblem(422, f"'{name}' is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPProblem(413, f"'{name}' has too many pixels (decompression bomb guard)") from None
    except Exception as exc:
        raise HTTPProblem(422, f"'{name}' is a damaged image: {exc}") from None


def create_app(model_path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, top_k: int = 5, max_batch: int = 16) -> FastAPI:
    """The FastAPI app serving one model (an artifact directory or an exported ``.onnx`` file)."""
    predictor = load_model(model_path)
    batcher = Batcher(lambda imgs: predictor.predict_proba(list(imgs))[0], max_batch=max_batch)
    app = FastAPI(title="transferlab", version="1", description="Image classification with a transferlab model.")
    app.state.predictor = predictor

    @app.on_event("startup")
    async def _start() -> None:  # noqa: ANN202
        await batcher.start()

    @app.exception_handler(HTTPProblem)
    async def _problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _limit_size(request: Request, call_next):  # noqa: ANN202
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return JSONResponse({"error": f"request body of {length} bytes is over the limit of {max_bytes} bytes"},
                                status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "classes": len(predictor.classes), "engine": predictor.engine}

    @app.get("/labels")
    async def labels() -> dict[str, Any]:
        return {"labels": predictor.classes}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("transferlab.service").joinpath("page.html").read_text(encoding="utf-8")

    @app.post("/predict", responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def predict(request: Request) -> dict[str, Any]:
        """Multipart form with an image in ``file`` (or several in ``files``); returns top-k labels."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPProblem(415, f"expected multipart/form-data with a 'file' field, got content type {ctype or 'none'!r}")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise HTTPProblem(413, f"request body is over the limit of {max_bytes} bytes")
        if not body:
            raise HTTPProblem(400, "empty request: send an image in the 'file' field")
        uploads = await _parse_multipart(bytes(body), ctype)
        if not uploads:
            raise HTTPProblem(400, "no image in the request: send it in the 'file' (or 'files') field")
        images = [_decode_upload(data, name, max_pixels) for name, data in uploads]
        probs = await batcher.submit(images)
        k = max(1, min(top_k, len(predictor.classes)))
        results = []
        for (name, _), p in zip(uploads, probs):
            order = np.argsort(-p)[:k]
            results.append({"filename": name, "label": predictor.classes[order[0]], "probability": float(p[order[0]]),
                            "predictions": [{"label": predictor.classes[j], "index": int(j), "probability": float(p[j])}
                                            for j in order]})
        return {"results": results, **results[0]} if len(results) == 1 else {"results": results}

    return app


async def _parse_multipart(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    """The uploaded files of fields ``file`` and ``files``, parsed by Starlette's multipart parser."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers({"content-type": ctype}), stream(), max_files=64, max_fields=64).parse()
    except MultiPartException as exc:
        raise HTTPProblem(400, f"malformed multipart body: {exc.message}") from None
    except Exception as exc:
        raise HTTPProblem(400, f"malformed multipart body: {exc}") from None
    out = []
    for key in ("file", "files"):
        for item in form.getlist(key):
            if isinstance(item, UploadFile):
                out.append((item.filename or key, await item.read()))
            else:
                raise HTTPProblem(400, f"field '{key}' must be a file upload, not text")
    return out


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` with several workers (reads TRANSFERLAB_SERVE_* variables)."""
    return create_app(os.environ["TRANSFERLAB_SERVE_MODEL"],
                      max_bytes=int(os.environ.get("TRANSFERLAB_SERVE_MAX_BYTES", DEFAULT_MAX_BYTES)),
                      max_pixels=int(os.environ.get("TRANSFERLAB_SERVE_MAX_PIXELS", DEFAULT_MAX_PIXELS)))


def serve(model_path: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    load_model(model_path)  # fail fast with a clear error before starting workers
    os.environ["TRANSFERLAB_SERVE_MODEL"] = str(Path(model_path).resolve())
    os.environ["TRANSFERLAB_SERVE_MAX_BYTES"] = str(max_bytes)
    os.environ["TRANSFERLAB_SERVE_MAX_PIXELS"] = str(max_pixels)
    uvicorn.run("transferlab.service.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info")
