"""The HTTP service: ``POST /predict``, ``GET /health``, ``GET /labels``, the web page at ``/``.

Hostile input gets a 4xx with a JSON error body, never a 500: bodies over ``max_bytes`` (413), images
over ``max_pixels`` (413, decompression bombs), non-images and truncated images (422), a wrong content
type (415), an empty request (400), too many pixels in one request (413), a full queue (503), a
missing API key (401) and a cross-site request from a web page (403).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..data.images import decode, peek_size
from ..errors import ConfigError, ImageError, ImageTooLargeError
from ..predict import decide_row, load_model
from .batcher import Batcher, QueueFull

__all__ = ["create_app", "app_from_env", "refuse_request", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_REQUEST_PIXELS"]

log = logging.getLogger("transferlab")

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
#: All the images of one request together (five 40-megapixel photos).
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000


class HTTPProblem(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _prepare_upload(data: bytes, name: str, max_pixels: int, transform: Any) -> Any:
    """The upload decoded through the same guards as every file (:func:`~transferlab.data.images.decode`)
    and preprocessed at once, so a request holds one full-size picture at a time, never all of them.
    Empty uploads were refused by :func:`_request_pixels`, which runs first."""
    try:
        return transform(decode(data, max_pixels=max_pixels, name=f"'{name}'")[0])
    except ImageTooLargeError as exc:
        raise HTTPProblem(413, str(exc)) from None
    except ImageError as exc:
        raise HTTPProblem(422, str(exc)) from None


def _request_pixels(uploads: list[tuple[str, bytes]], max_request_pixels: int) -> None:
    """Refuse a request whose images together have more than ``max_request_pixels`` pixels (read from
    their headers, before any is decoded)."""
    total = 0
    for name, data in uploads:
        if not data:
            raise HTTPProblem(400, f"'{name}' is empty")
        try:
            w, h = peek_size(data, name=f"'{name}'")
        except ImageTooLargeError as exc:
            raise HTTPProblem(413, str(exc)) from None
        except ImageError as exc:
            raise HTTPProblem(422, str(exc)) from None
        total += w * h
    if total > max_request_pixels:
        raise HTTPProblem(413, f"the request's {len(uploads)} images have {total} pixels together; the limit per "
                               f"request is {max_request_pixels} (send fewer or smaller images)")


def _same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names the host it is sending to (a page of this service)."""
    netloc = urlsplit(origin).netloc
    return bool(netloc) and netloc.lower() == host.lower()


def refuse_request(request: Request, *, api_key: str | None, max_bytes: int, open_paths: Sequence[str],
                   cookie: str | None = None) -> JSONResponse | None:
    """The answer to a request that must not go further, or None: a cross-site request from a web page
    (403), a missing or wrong API key outside ``open_paths`` (401; the key as ``Authorization: Bearer`` or,
    with ``cookie``, in that cookie), a declared body over ``max_bytes`` (413). The service and the studio
    both guard every request with it."""
    origin = request.headers.get("origin")
    if origin is not None and not _same_origin(origin, request.headers.get("host", "")):
        return JSONResponse({"error": f"cross-site request from {origin!r} refused"}, status_code=403)
    if api_key and request.url.path not in open_paths:
        given = request.headers.get("authorization", "")
        if not given and cookie:
            given = f"Bearer {request.cookies.get(cookie, '')}"
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        return JSONResponse({"error": f"request body of {length} bytes is over the limit of {max_bytes} bytes"},
                            status_code=413)
    return None


def create_app(model_path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
               top_k: int = 5, max_batch: int = 16, max_queue: int = 256, api_key: str | None = None,
               open_set: bool = False, engine: str = "auto") -> FastAPI:
    """The FastAPI app serving one model (an artifact directory or an exported ``.onnx`` file).

    ``max_pixels`` bounds each image and ``max_request_pixels`` all the images of one request;
    ``max_queue`` bounds the images waiting for the model (more: 503 with ``Retry-After``). With
    ``api_key``, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``. Requests a
    browser sends from another site's page (an ``Origin`` that is not this host) are refused (403). With
    ``open_set``, an image unlike every class is labelled ``unknown`` and each result has its ``ood_score``.
    ``engine`` runs the backbone (``auto``, ``torch``, ``onnxruntime``); it is chosen here, before the first
    request, so that no request waits for a measurement.
    """
    predictor = load_model(model_path, keep_memory=False, engine=engine)
    choice = predictor.choice  # the engine is opened (and measured, the first time) now
    if open_set and predictor.openset is None:
        raise ConfigError(f"--open-set: '{model_path}' has no open-set scorer (train it again; it needs a "
                          "validation split and a backbone that was not fine-tuned).")

    def predict_fn(imgs: Sequence[Any]) -> np.ndarray:  # probabilities, and the open-set score as a last column
        probs, _, scores = predictor.predict_scores(list(imgs), open_set=open_set)
        return probs if scores is None else np.hstack([probs, scores[:, None]])

    batcher = Batcher(predict_fn, max_batch=max_batch, max_queue=max_queue)
    app = FastAPI(title="transferlab", version="1", description="Image classification with a transferlab model.")
    app.state.predictor = predictor

    @app.on_event("startup")
    async def _start() -> None:  # noqa: ANN202
        await batcher.start()

    @app.on_event("shutdown")
    async def _stop() -> None:  # noqa: ANN202
        await batcher.stop()  # its loop task ends with the server, not as a pending task at interpreter exit

    @app.exception_handler(HTTPProblem)
    async def _problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN202
        refused = refuse_request(request, api_key=api_key, max_bytes=max_bytes, open_paths=("/health",))
        return refused if refused is not None else await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "classes": len(predictor.classes), "engine": choice.engine,
                "engine_reason": choice.reason}

    @app.get("/labels")
    async def labels() -> dict[str, Any]:
        return {"labels": predictor.classes}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("transferlab.service").joinpath("page.html").read_text(encoding="utf-8")

    @app.post("/predict", responses={400: {}, 401: {}, 403: {}, 413: {}, 415: {}, 422: {}, 503: {}})
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
        _request_pixels(uploads, max_request_pixels)
        images = [await asyncio.to_thread(_prepare_upload, data, name, max_pixels, predictor.transform)
                  for name, data in uploads]  # off the event loop: /health answers meanwhile
        try:
            probs = await batcher.submit(images)
        except QueueFull as exc:
            return JSONResponse({"error": f"busy: {exc}; try again shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
        results = []
        for (name, _), row in zip(uploads, probs):
            results.append({"filename": name, **decide_row(row[:len(predictor.classes)], predictor.classes, top_k,
                                                           thresholds=predictor.thresholds)})
            if open_set:
                results[-1]["ood_score"] = float(row[-1])
                if row[-1] > predictor.openset.threshold:
                    results[-1]["label"] = "unknown"
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
    """App factory for ``uvicorn --factory`` with several workers (reads TRANSFERLAB_SERVE_* variables and
    the API key from ``TRANSFERLAB_API_KEY``)."""
    return create_app(os.environ["TRANSFERLAB_SERVE_MODEL"],
                      max_bytes=int(os.environ.get("TRANSFERLAB_SERVE_MAX_BYTES", DEFAULT_MAX_BYTES)),
                      max_pixels=int(os.environ.get("TRANSFERLAB_SERVE_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
                      api_key=os.environ.get("TRANSFERLAB_API_KEY") or None,
                      open_set=os.environ.get("TRANSFERLAB_SERVE_OPEN_SET") == "1",
                      engine=os.environ.get("TRANSFERLAB_SERVE_ENGINE", "auto"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(model_path: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, api_key: str | None = None,
          open_set: bool = False, engine: str = "auto") -> None:
    """Run the service with uvicorn (blocking). Binding beyond loopback without ``api_key`` warns."""
    import uvicorn

    # fail fast with a clear error before starting workers; the engine's measurement and graph are cached for them
    log.info("%s", load_model(model_path, engine=engine).choice.line())
    if not api_key and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(give --api-key or set TRANSFERLAB_API_KEY)", host)
    os.environ["TRANSFERLAB_SERVE_MODEL"] = str(Path(model_path).resolve())
    os.environ["TRANSFERLAB_SERVE_MAX_BYTES"] = str(max_bytes)
    os.environ["TRANSFERLAB_SERVE_MAX_PIXELS"] = str(max_pixels)
    os.environ["TRANSFERLAB_SERVE_OPEN_SET"] = "1" if open_set else "0"
    os.environ["TRANSFERLAB_SERVE_ENGINE"] = engine
    if api_key:
        os.environ["TRANSFERLAB_API_KEY"] = api_key
    uvicorn.run("transferlab.service.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info")
