"""The HTTP service: API in-process, hostile input, and the page driven in headless Chromium."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from transferlab.service import create_app

from .test_report import _chromium


@pytest.fixture(scope="module")
def test_image(trained_run):
    row = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))[0]
    return row["path"], row["predicted_label"]


@pytest.fixture(scope="module")
def client(trained_run):
    with TestClient(create_app(trained_run.model_dir, max_bytes=200_000, max_pixels=5_000_000)) as c:
        yield c


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_headless_chromium_predicts(trained_run, test_image):
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed here (CI installs it)")
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "serve", str(trained_run.model_dir),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
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
    finally:
        server.terminate()
        server.wait(timeout=30)
