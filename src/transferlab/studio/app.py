"""transferlab studio: the whole job in a browser page, over a project folder (see :mod:`.project`).

JSON API under ``/api`` and the page at ``/``; every asset is in the package, no request leaves the machine.
Security as for ``serve``: loopback by default, an API key beyond it (``Authorization: Bearer`` or the
cookie the page gets from ``POST /api/login``), cross-site requests refused, upload limits, and no path from
the page ever leaves the project folder.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import os
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from ..config import DEFAULT_BACKBONE
from ..errors import ConfigError, DataError, ImageError, TransferlabError
from ..predict import decide_row
from ..service.app import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, HTTPProblem, _parse_multipart, is_loopback, \
    refuse_request
from .jobs import TrainingJob, start_training
from .project import Project, safe_download_name

__all__ = ["create_studio", "run_studio", "BUDGETS"]

#: The page's time budgets (seconds).
BUDGETS = (60, 300, 900)
COOKIE = "transferlab_studio_key"


def create_studio(project_dir: str | os.PathLike[str], *, api_key: str | None = None,
                  max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The studio app over ``project_dir`` (created if missing)."""
    project = Project(Path(project_dir))
    app = FastAPI(title="transferlab studio", version="1")
    state: dict[str, Any] = {"job": None, "predictor": None, "predictor_run": None}
    app.state.project, app.state.studio = project, state

    @app.exception_handler(HTTPProblem)
    async def _problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(TransferlabError)
    async def _refused(_: Request, exc: TransferlabError) -> JSONResponse:
        status = 409 if isinstance(exc, ConfigError) and "already running" in str(exc) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN202
        refused = refuse_request(request, api_key=api_key, max_bytes=max_bytes,
                                 open_paths=("/", "/api/login", "/api/health"), cookie=COOKIE)
        return refused if refused is not None else await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("transferlab.studio").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "project": project.root.name, "key_required": bool(api_key)}

    @app.post("/api/login")
    async def login(request: Request) -> Response:
        key = (await _json(request)).get("key", "")
        if not api_key or not hmac.compare_digest(str(key).encode(), api_key.encode()):
            raise HTTPProblem(401, "wrong API key")
        resp = JSONResponse({"ok": True})
        resp.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
        return resp

    # ---- data
    @app.get("/api/classes")
    async def classes() -> dict[str, Any]:
        return {"classes": project.classes()}

    @app.post("/api/classes")
    async def add_class(request: Request) -> dict[str, Any]:
        project.add_class(str((await _json(request)).get("name", "")).strip())
        return {"classes": project.classes()}

    @app.patch("/api/classes/{name}")
    async def rename_class(name: str, request: Request) -> dict[str, Any]:
        project.rename_class(name, str((await _json(request)).get("name", "")).strip())
        return {"classes": project.classes()}

    @app.delete("/api/classes/{name}")
    async def remove_class(name: str) -> dict[str, Any]:
        where = project.remove_class(name)
        return {"classes": project.classes(), "moved_to": str(where.relative_to(project.root))}

    @app.post("/api/classes/{name}/images")
    async def add_images(name: str, request: Request) -> dict[str, Any]:
        project.class_dir(name)
        uploads = await _uploads(request)
        added, refused = [], []
        for filename, data in uploads:
            try:
                added.append(await asyncio.to_thread(project.add_image, name, data, max_pixels))
            except ImageError as exc:
                refused.append({"file": filename, "reason": exc.reason})
        return {"added": added, "refused": refused, "classes": project.classes()}

    @app.get("/api/classes/{name}/images/{file}")
    async def image(name: str, file: str) -> FileResponse:
        return FileResponse(project.image_path(name, file))

    @app.delete("/api/classes/{name}/images/{file}")
    async def remove_image(name: str, file: str) -> dict[str, Any]:
        project.remove_image(name, file)
        return {"classes": project.classes()}

    @app.get("/api/check")
    async def check() -> dict[str, Any]:
        from ..data.audit import audit
        from ..data.scan import scan
        from ..data.split import split_dataset

        def run() -> dict[str, Any]:
            ds = split_dataset(scan(project.data))
            rep = audit(ds)
            return {"warnings": rep.warnings, "counts": rep.counts, "unreadable": rep.unreadable,
                    "exact_duplicates": rep.exact_duplicates, "skipped": [[k.path, k.reason] for k in ds.skipped]}
        return await asyncio.to_thread(run)

    # ---- training
    @app.post("/api/train")
    async def train(request: Request) -> dict[str, Any]:
        body = await _json(request)
        budget = body.get("budget_s", BUDGETS[0])
        if budget not in BUDGETS:
            raise HTTPProblem(400, f"budget_s {budget!r}: expected one of {', '.join(map(str, BUDGETS))} (seconds)")
        job: TrainingJob | None = state["job"]
        if job is not None and job.poll()["status"] == "running":
            raise HTTPProblem(409, "a training is already running; wait for it or cancel it first.")
        mode = "head" if body.get("quick") else "auto"
        state["job"] = await asyncio.to_thread(start_training, project, budget,
                                               str(body.get("backbone") or DEFAULT_BACKBONE), mode)
        return state["job"].poll()

    @app.post("/api/train/cancel")
    async def cancel() -> dict[str, Any]:
        job: TrainingJob | None = state["job"]
        if job is None:
            raise HTTPProblem(409, "no training to cancel")
        await asyncio.to_thread(job.cancel)
        return job.poll()

    @app.get("/api/train")
    async def train_state() -> dict[str, Any]:
        job: TrainingJob | None = state["job"]
        return job.poll() if job is not None else {"status": "idle"}

    @app.get("/api/train/events")
    async def events() -> StreamingResponse:
        """Server-sent events: the job's state twice a second until it ends."""
        async def stream():
            while True:
                job: TrainingJob | None = state["job"]
                now = job.poll() if job is not None else {"status": "idle"}
                yield f"data: {json.dumps(now)}\n\n"
                if now["status"] != "running":
                    return
                await asyncio.sleep(0.5)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- results
    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        return {"runs": project.run_list(), "selected": project.selected_run()}

    @app.post("/api/runs/{name}/use")
    async def use(name: str) -> dict[str, Any]:
        project.select_run(name)
        return {"runs": project.run_list(), "selected": name}

    @app.get("/runs/{name}/report.html", response_class=HTMLResponse)
    async def report(name: str) -> FileResponse:
        return FileResponse(project.run_dir(name) / "report.html", media_type="text/html")

    # ---- try it
    @app.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        uploads = await _uploads(request)
        predictor = await asyncio.to_thread(_predictor, project, state)
        from ..data.images import decode

        results = []
        for filename, data in uploads[:8]:
            try:
                img = await asyncio.to_thread(lambda: predictor.transform(decode(data, max_pixels=max_pixels)[0]))
            except ImageError as exc:
                results.append({"filename": filename, "error": exc.reason})
                continue
            probs, _ = await asyncio.to_thread(predictor.predict_proba, [img])
            results.append({"filename": filename, **decide_row(probs[0], predictor.classes, 5,
                                                                thresholds=predictor.thresholds)})
        return {"run": state["predictor_run"], "results": results}

    # ---- export
    @app.post("/api/runs/{name}/export")
    async def export(name: str, request: Request) -> dict[str, Any]:
        from ..export import export_model

        body = await _json(request)
        fmt, int8 = str(body.get("format", "onnx")), bool(body.get("int8", False))
        model = project.run_dir(name) / "model"
        check = await asyncio.to_thread(export_model, model, fmt, None, int8)
        return {"check": check, "download": f"/api/runs/{name}/files/{Path(check['file']).name}"}

    @app.get("/api/runs/{name}/files/{file}")
    async def download(name: str, file: str) -> Response:
        model = project.run_dir(name) / "model"
        if file == "model.zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(model.iterdir()):
                    if p.is_file() and not p.name.startswith("."):
                        z.write(p, f"{name}/model/{p.name}")
            return Response(buf.getvalue(), media_type="application/zip", headers={
                "Content-Disposition": f'attachment; filename="{safe_download_name(name)}-model.zip"'})
        allowed = {"model.onnx", "model.int8.onnx", "model.torchscript.pt"}
        if file not in allowed or not (model / file).is_file():
            raise HTTPProblem(404, f"no exported file '{file}' for run '{name}'; export it first")
        return FileResponse(model / file, filename=f"{safe_download_name(name)}-{file}")

    return app


def _predictor(project: Project, state: dict[str, Any]) -> Any:
    """The selected run's model, loaded once per selection."""
    from ..predict import load_model

    run = project.selected_run()
    if run is None:
        raise DataError("no trained model yet: train one first.")
    if state["predictor_run"] != run:
        state["predictor"], state["predictor_run"] = load_model(project.runs / run / "model", keep_memory=False), run
    return state["predictor"]


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPProblem(400, "expected a JSON body") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "expected a JSON object")
    return body


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPProblem(415, f"expected multipart/form-data with files, got {ctype or 'none'!r}")
    uploads = await _parse_multipart(await request.body(), ctype)
    if not uploads:
        raise HTTPProblem(400, "no file in the request: send them in the 'file' or 'files' field")
    return uploads


def run_studio(project_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None) -> None:
    """Run the studio with uvicorn (blocking). Beyond loopback an API key is required."""
    import uvicorn

    if not api_key and not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines: give --api-key (or set "
                          "TRANSFERLAB_API_KEY) so that only you can change the project.")
    uvicorn.run(create_studio(project_dir, api_key=api_key), host=host, port=port, log_level="warning")
