"""Shared fixtures: real pictures from scikit-image and scikit-learn, written into tmp folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in two worker processes: one thread of compute each (their own children inherit it), so
    # that the two share the cores instead of oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: Fixtures that train a network: a test that reads one is end to end, whatever its own cost.
TRAINED_FIXTURES = {"trained_run", "single_head_run"}


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that needs a trained run (the ``@pytest.mark.slow`` tests train one themselves)."""
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Every test uses a private TRANSFERLAB_HOME (weights cache, feature cache); never the network."""
    home = tmp_path_factory.mktemp("tlhome")
    old = {k: os.environ.get(k) for k in ("TRANSFERLAB_HOME", "TRANSFERLAB_ALLOW_DOWNLOAD", "HF_HUB_OFFLINE")}
    os.environ["TRANSFERLAB_HOME"] = str(home)
    os.environ.pop("TRANSFERLAB_ALLOW_DOWNLOAD", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sample_photo(name: str) -> np.ndarray:
    """An RGB sample photograph shipped with scikit-image (coffee, chelsea, astronaut, rocket...)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def photo_crops(name: str, n: int, size: int = 96, seed: int = 0) -> list[Image.Image]:
    """``n`` random crops of a sample photo, resized to ``size`` (distinct real pictures of one subject)."""
    rng = np.random.default_rng(seed)
    img = sample_photo(name)
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        ch, cw = int(h * rng.uniform(0.6, 0.95)), int(w * rng.uniform(0.6, 0.95))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out.append(Image.fromarray(img[y:y + ch, x:x + cw]).resize((size, size)))
    return out


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Two classes of real photos (cat crops, coffee crops), 12 JPEGs each."""
    root = tmp_path_factory.mktemp("photos")
    for label, name in (("cat", "chelsea"), ("coffee", "coffee")):
        (root / label).mkdir()
        for i, im in enumerate(photo_crops(name, 12, seed=1)):
            im.save(root / label / f"{label}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits as PNG class folders, 20 per class (200 images)."""
    from transferlab.demo import build_digits_dataset

    return build_digits_dataset(tmp_path_factory.mktemp("digits"), per_class=20)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_dir):
    """One head-mode run on the small digits set (at the backbone's 224 px, where the open-set and TTA tests'
    expectations hold), shared by the tests that read a run, its artifact or its predictions."""
    from transferlab.pipeline import train

    return train(digits_dir, tmp_path_factory.mktemp("run") / "run", mode="head", quiet=True)


def chromium_path() -> str | None:
    """The headless browser for page tests: Debian's Chromium (a failure in CI, a skip elsewhere)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
    pytest.skip("Chromium is not installed here (CI installs it): cannot render the page")


def render_page(path: Path) -> tuple[int, bool, list[str], list[str]]:
    """Open a local HTML file in headless Chromium: (number of images, all decoded, console errors,
    URLs requested)."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(Path(path).resolve().as_uri())
        page.wait_for_load_state("load")
        n_images = page.evaluate("document.images.length")
        loaded = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        browser.close()
    return n_images, loaded, errors, requests


def free_port() -> int:
    """A TCP port nothing listens on now (for a server or a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(*args: str, health: str = "/health"):
    """``transferlab ARGS --port PORT`` in its own process on a free port, once ``health`` answers 200:
    yields (process, url); the process is stopped on exit."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "transferlab.cli", *args, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=30)
