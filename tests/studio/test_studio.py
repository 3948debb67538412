"""transferlab studio: the project API in-process, training events and cancel, and the whole job driven in
headless Chromium with a fake camera."""

from __future__ import annotations

import pytest

import io
import json
import os
import time
from pathlib import Path

from fastapi.testclient import TestClient

from ..conftest import chromium_path, photo_crops, served
from transferlab.studio import create_studio

SCREENSHOTS = os.environ.get("TRANSFERLAB_STUDIO_SCREENSHOTS")  # a folder to keep the screenshots in (README)


def _jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _files(images, name="p.jpg"):
    return [("files", (f"{name}{i}.jpg", _jpeg(im), "image/jpeg")) for i, im in enumerate(images)]


def test_studio_project_api_and_its_refusals(tmp_path):
    project = tmp_path / "proj"
    with TestClient(create_studio(project)) as c:
        assert c.post("/api/classes", json={"name": "cat"}).status_code == 200
        assert c.post("/api/classes", json={"name": "coffee"}).status_code == 200
        for bad in ("../evil", "a/b", "", ".."):
            r = c.post("/api/classes", json={"name": bad})
            assert r.status_code == 400 and "error" in r.json(), bad
        assert c.post("/api/classes", json={"name": "cat"}).status_code == 400  # exists
        files = _files(photo_crops("chelsea", 3, seed=2)) + [("files", ("notes.jpg", b"just text", "image/jpeg"))]
        r = c.post("/api/classes/cat/images", files=files).json()
        assert len(r["added"]) == 3 and r["refused"][0]["file"] == "notes.jpg" and r["refused"][0]["reason"]
        assert sorted(p.name for p in (project / "data" / "cat").iterdir()) == sorted(r["added"])
        first = r["added"][0]
        assert c.get(f"/api/classes/cat/images/{first}").content[:2] == b"\xff\xd8"
        assert c.get("/api/classes/cat/images/..%2F..%2Fstudio.json").status_code in (400, 404)
        assert c.delete(f"/api/classes/cat/images/{first}").status_code == 200
        assert list((project / ".trash").rglob(first)), "removed images go to the trash, not away"
        assert c.patch("/api/classes/coffee", json={"name": "espresso"}).status_code == 200
        assert [x["name"] for x in c.get("/api/classes").json()["classes"]] == ["cat", "espresso"]
        moved = c.delete("/api/classes/espresso").json()["moved_to"]
        assert (project / moved).is_dir() and not (project / "data" / "espresso").exists()
        assert c.post("/api/classes", json={"name": "x"}, headers={"Origin": "http://evil.example"}).status_code == 403
        for bad in (7, "abc", None, [60]):
            assert c.post("/api/train", json={"budget_s": bad}).status_code == 400, bad
        assert c.post("/api/predict", files=_files(photo_crops("chelsea", 1))).status_code == 400  # no model yet
    with TestClient(create_studio(project, api_key="s3cret")) as c:
        assert c.get("/").status_code == 200 and c.get("/api/health").json()["key_required"]
        assert c.get("/api/classes").status_code == 401
        assert c.post("/api/login", json={"key": "wrong"}).status_code == 401
        assert c.post("/api/login", json={"key": "s3cret"}).status_code == 200  # sets the cookie
        assert c.get("/api/classes").status_code == 200


def _project_with_photos(root: Path, n: int = 12) -> Path:
    for label, name in (("cat", "chelsea"), ("coffee", "coffee")):
        (root / "data" / label).mkdir(parents=True)
        for i, im in enumerate(photo_crops(name, n, seed=4)):
            im.save(root / "data" / label / f"{i:02d}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_training_events_every_second_and_cancel_within_5s(tmp_path):
    project = _project_with_photos(tmp_path / "proj")
    before = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
    with TestClient(create_studio(project)) as c:
        assert c.post("/api/train", json={"budget_s": 60}).json()["status"] == "running"
        assert c.post("/api/train", json={"budget_s": 60}).status_code == 409  # one training at a time
        times, states = [], []
        with c.stream("GET", "/api/train/events") as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    times.append(time.monotonic())
                    states.append(json.loads(line[6:]))
                    if times[-1] - times[0] > 8 and states[-1].get("phase"):
                        break
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= 9 and max(gaps) <= 1.0, gaps  # progress at least once a second
        assert states[-1]["status"] == "running" and states[-1]["plan"], states[-1]
        t0 = time.monotonic()
        state = c.post("/api/train/cancel").json()
        assert time.monotonic() - t0 <= 5.0 and state["status"] == "cancelled"
        run = project / "runs" / state["run"]
        assert not run.exists() and not (project / ".studio-train.lock").exists()
        assert list((project / ".trash").glob(f"*/runs/{state['run']}"))  # the unfinished run, kept aside
        assert c.get("/api/runs").json()["runs"] == []
        after = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
        assert after == before  # the data is as it was
        assert c.post("/api/train", json={"budget_s": 60, "quick": True}).json()["status"] == "running"
        c.post("/api/train/cancel")


@pytest.mark.slow
def test_studio_end_to_end_in_chromium_with_a_fake_camera(tmp_path):
    """Create two classes, fill one from the (fake) camera and the other by file upload, train with the
    1-minute budget, read the report, predict a picture, download the ONNX export."""
    chromium = chromium_path()
    from playwright.sync_api import sync_playwright

    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "screens"
    shots.mkdir(parents=True, exist_ok=True)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for i, im in enumerate(photo_crops("coffee", 10, seed=7)):
        im.save(uploads / f"coffee{i}.jpg", quality=90)
    probe = tmp_path / "probe.jpg"
    photo_crops("coffee", 1, seed=99)[0].save(probe, quality=90)
    errors: list[str] = []
    with served("studio", str(tmp_path / "proj"), health="/api/health") as (_, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            "--disable-background-networking", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
        context.grant_permissions(["camera"], origin=url)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        for name in ("camera", "coffee"):
            page.fill("#new-class", name)
            page.keyboard.press("Enter")
            page.wait_for_selector(f"[data-class='{name}']")
        page.click("#camera-btn")
        page.wait_for_function("!document.querySelector(\"[data-capture='camera']\").disabled")
        for _ in range(10):
            page.click("[data-capture='camera']")
            page.wait_for_timeout(150)
        page.wait_for_function("document.querySelector(\"[data-class='camera'] span\").textContent.includes('(10)')",
                               timeout=30000)
        page.set_input_files("#files-coffee", [str(f) for f in sorted(uploads.iterdir())])
        page.wait_for_function("document.querySelector(\"[data-class='coffee'] span\").textContent.includes('(10)')",
                               timeout=30000)
        page.screenshot(path=str(shots / "1-data.png"), full_page=True)

        page.click("#tab-train")
        page.check("#quick")
        page.click("#start")
        page.wait_for_function("document.getElementById('phase').textContent.startsWith('Done')", timeout=180000)
        page.screenshot(path=str(shots / "2-train.png"), full_page=True)

        page.click("#tab-results")
        page.wait_for_selector("#runs table")
        page.wait_for_function("(() => { const d = document.getElementById('report').contentDocument; "
                               "return !!(d && d.body && d.body.innerText.includes('test accuracy')); })()",
                               timeout=30000)  # the frame may still be loading: no body yet
        assert "in use" in page.text_content("#runs")
        page.screenshot(path=str(shots / "3-results.png"), full_page=True)

        page.click("#tab-try")
        page.set_input_files("#try-file", str(probe))
        page.wait_for_function("document.getElementById('answer').textContent.length > 0", timeout=30000)
        answer = page.text_content("#answer")
        assert page.locator(".bar-row").count() == 2
        page.screenshot(path=str(shots / "4-try.png"), full_page=True)

        page.click("#tab-export")
        page.click("#onnx-btn")
        page.wait_for_selector("#export-out a", timeout=120000)
        assert "Check passed" in page.text_content("#export-out")
        with page.expect_download() as dl:
            page.click("#export-out a")
        saved = tmp_path / "model.onnx"
        dl.value.save_as(saved)
        page.screenshot(path=str(shots / "5-export.png"), full_page=True)
        browser.close()
    assert answer == "coffee"
    assert saved.stat().st_size > 1_000_000 and saved.read_bytes()[:2] != b"{\""  # a model, not an error
    assert errors == []
    from transferlab.predict import load_model

    assert load_model(saved).predict([str(probe)])[0].label == "coffee"
    assert len(list(shots.glob("*.png"))) == 5


def test_the_progress_view_shows_the_race_and_keeps_the_runs_history(tmp_path):
    from transferlab.studio.jobs import TrainingJob
    from transferlab.studio.project import Project

    events = tmp_path / "events.jsonl"
    lines = [{"kind": "plan", "lines": ["plan: 64px input"], "estimate_s": 30},
             {"kind": "race_line", "line": "race rung 1: recipe 5s (slice 5s), best validation accuracy 0.9000"},
             {"kind": "step", "phase": "race bn-adapt", "global_step": 3, "max_steps": 9},
             {"kind": "history", "rows": [{"epoch": 1, "phase": "race bn-adapt", "val_acc": 0.5}]}]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))

    class Done:
        pid, returncode = 0, None

        def poll(self):
            return None

    job = TrainingJob(Project(tmp_path / "proj"), "r1", 60.0, Done(), events, tmp_path / "log.txt")
    state = job.poll()
    assert state["plan"] == ["plan: 64px input", lines[1]["line"]]
    assert state["phase"] == "Racing: bn-adapt" and state["progress"] == {"done": 3, "total": 9}
    assert "history" not in state  # a rung's rows are not the run's history
    with events.open("a") as f:
        f.write(json.dumps({"kind": "history", "rows": [{"epoch": 1, "phase": "finetune", "val_acc": 0.9}]}) + "\n")
    assert job.poll()["history"][0]["phase"] == "finetune"
