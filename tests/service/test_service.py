"""The HTTP service: API in-process, hostile input, and the page driven in headless Chromium."""

from __future__ import annotations

import csv
import io

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from transferlab.service import create_app

from ..conftest import chromium_path, served


@pytest.fixture(scope="module")
def test_image(trained_run):
    row = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[0]
    return row["path"], row["predicted_label"]


@pytest.fixture(scope="module")
def client(trained_run):
    with TestClient(create_app(trained_run.model_dir, max_bytes=200_000, max_pixels=5_000_000)) as c:
        yield c


@pytest.mark.slow
def test_predict_health_labels(client, test_image):
    path, label = test_image
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/labels").json()["labels"] == [str(i) for i in range(10)]
    with open(path, "rb") as f:
        r = client.post("/predict", files={"file": ("x.png", f, "image/png")})
    assert r.status_code == 200 and r.json()["label"] == label
    assert len(r.json()["predictions"]) == 5
    with open(path, "rb") as f:
        data = f.read()
    r = client.post("/predict", files=[("files", ("a.png", data)), ("files", ("b.png", data))])
    assert r.status_code == 200 and [x["label"] for x in r.json()["results"]] == [label, label]
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/").text
    assert "<input id=\"file\"" in page and "http://" not in page and "https://" not in page


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_hostile_inputs_are_4xx_json(client, test_image):
    path, _ = test_image
    good = open(path, "rb").read()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 M pixels declared, a few kB on disk
    cases = {
        "too large body": (dict(files={"file": ("big.png", b"\x00" * 300_000)}), 413),
        "decompression bomb": (dict(files={"file": ("bomb.png", bomb.getvalue())}), 413),
        "not an image": (dict(files={"file": ("a.png", b"this is text")}), 422),
        "truncated image": (dict(files={"file": ("t.png", good[: len(good) // 2])}), 422),
        "wrong content type": (dict(content=b'{"a": 1}', headers={"content-type": "application/json"}), 415),
        "empty request": (dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400),
        "no file field": (dict(files={"other": ("a.png", good)}), 400),
        "empty file": (dict(files={"file": ("e.png", b"")}), 400),
    }
    for name, (kwargs, status) in cases.items():
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert "error" in r.json(), name
    assert client.get("/health").status_code == 200


@pytest.mark.slow
def test_page_in_headless_chromium_predicts(trained_run, test_image):
    chromium = chromium_path()
    from playwright.sync_api import sync_playwright

    with served("serve", str(trained_run.model_dir)) as (_, url):
        path, label = test_image
        errors = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.keyboard.press("Tab")  # keyboard alone reaches the chooser
            assert page.evaluate("document.activeElement.id") == "choose"
            page.set_input_files("#file", path)
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=60000)
            shown = page.text_content("#label")
            bars = page.locator(".bar").count()
            browser.close()
        assert shown == label and bars == 5 and errors == []


def _solid_png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 7).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_pixel_and_body_limits_are_the_services_own(client, test_image):
    # 6 M pixels: under Pillow's own guard (89 M), over this app's max_pixels (5 M)
    r = client.post("/predict", files={"file": ("p.png", _solid_png((3000, 2000)))})
    assert r.status_code == 413 and "5000000 pixels" in r.json()["error"]
    # a chunked body has no Content-Length: only the streaming limit can stop it
    def chunks():
        for _ in range(40):
            yield b"\x00" * 10_000
    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "over the limit of 200000 bytes" in r.json()["error"]


def test_thin_and_eps_uploads_fail_alone_while_neighbours_get_answers(client, test_image):
    from concurrent.futures import ThreadPoolExecutor

    path, label = test_image
    good = open(path, "rb").read()
    thin = _solid_png((5, 800_000))  # under max_pixels; scaled to the input it would be 256 x 41 M pixels
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    bodies = [("good.png", good), ("thin.png", thin), ("fake.jpg", eps)] * 4
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda nb: client.post("/predict", files={"file": nb}), bodies))
    for (name, _), r in zip(bodies, answers):
        if name == "good.png":
            assert r.status_code == 200 and r.json()["label"] == label
        else:
            assert r.status_code == 422, (name, r.status_code, r.text)
    assert "aspect ratio" in answers[1].json()["error"] and "not an image in a supported format" in answers[2].json()["error"]


def test_batcher_answers_every_request_and_isolates_a_failing_image():
    import asyncio

    import numpy as np

    from transferlab.service.batcher import Batcher, QueueFull

    def predict(items):
        if "bad" in items:
            raise ValueError("this image breaks the model")
        return np.array([[float(i), 0.0] for i in items])

    async def run():
        b = Batcher(predict, max_batch=8, max_wait_s=0.01, max_queue=64)
        await b.start()
        results = await asyncio.gather(*[b.submit([i]) for i in range(40)], b.submit(["bad"]), return_exceptions=True)
        with pytest.raises(QueueFull):
            await b.submit(list(range(65)))
        await b.stop()
        return results

    results = asyncio.run(run())
    assert [float(r[0][0]) for r in results[:40]] == [float(i) for i in range(40)]  # N requests, N answers
    assert isinstance(results[40], ValueError)


@pytest.mark.slow
def test_api_key_and_cross_site_requests(trained_run, test_image):
    path, label = test_image
    good = open(path, "rb").read()
    with TestClient(create_app(trained_run.model_dir, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/labels").status_code == 401
        assert c.get("/labels", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/labels", headers=auth).status_code == 200
        r = c.post("/predict", files={"file": ("a.png", good)}, headers=auth)
        assert r.status_code == 200 and r.json()["label"] == label
    with TestClient(create_app(trained_run.model_dir)) as c:
        r = c.post("/predict", files={"file": ("a.png", good)}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.post("/predict", files={"file": ("a.png", good)}, headers={"Origin": "http://testserver"})
        assert r.status_code == 200


@pytest.mark.slow
def test_request_pixel_budget_keeps_the_service_small(trained_run, test_image):
    """64 files of 40 MP each (solid PNGs, a few MB in all) would decode to about 7.7 GB: the request is
    refused from the headers alone, a neighbour still gets its answer, and the server's peak RSS stays
    under 2 GB (read from /proc for the uvicorn process)."""
    path, label = test_image
    big = _solid_png((8000, 5000))
    with served("serve", str(trained_run.model_dir), "--max-bytes", str(64 * len(big) + 1_000_000)) as (server, url):
        r = httpx.post(url + "/predict", files=[("files", (f"{i}.png", big)) for i in range(64)], timeout=120)
        assert r.status_code == 413 and "limit per request" in r.json()["error"]
        r = httpx.post(url + "/predict", files={"file": ("a.png", open(path, "rb").read())}, timeout=60)
        assert r.status_code == 200 and r.json()["label"] == label
        peak_kb = int(next(line.split()[1] for line in open(f"/proc/{server.pid}/status") if line.startswith("VmHWM")))
        assert peak_kb < 2 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
