"""The studio's training job: ``transferlab train`` in a child process, watched through its events file,
cancellable at any moment.

A child process (not a thread) because cancelling must be immediate and complete: the process group gets
SIGTERM, then SIGKILL after two seconds, and the unfinished run folder is moved to the project's trash,
so the project holds only finished runs. One job at a time per project: a lock file holds the child's pid,
and a second start is refused while that process lives (from this server or another).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_BACKBONE
from ..errors import ConfigError
from ..events import EVENTS_ENV
from .project import Project

__all__ = ["TrainingJob", "start_training"]

LOCK = ".studio-train.lock"


@dataclass
class TrainingJob:
    """A running (or finished) training of a project."""

    project: Project
    run: str
    budget_s: float
    process: subprocess.Popen
    events_path: Path
    log_path: Path
    started: float = field(default_factory=time.time)
    status: str = "running"  # running, done, failed, cancelled
    error: str | None = None
    ended: float | None = None
    _offset: int = 0
    _state: dict[str, Any] = field(default_factory=dict)

    def poll(self) -> dict[str, Any]:
        """The job's state for the page: status, elapsed and budget seconds, phase, progress, plan, the epoch
        history, and the error of a failed run."""
        self._read_events()
        if self.status == "running" and self.process.poll() is not None:
            self._finish(self.process.returncode)
        now = self.ended or time.time()
        return {"status": self.status, "run": self.run, "elapsed_s": round(now - self.started, 1),
                "budget_s": self.budget_s, "error": self.error, **self._state}

    def cancel(self, grace_s: float = 2.0) -> None:
        """Stop the child process group (SIGTERM, then SIGKILL) and move the unfinished run to the trash."""
        if self.status != "running":
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.status, self.ended = "cancelled", time.time()
        self._cleanup(keep_run=False)

    def _finish(self, rc: int) -> None:
        self.ended = time.time()
        if rc == 0 and (self.project.runs / self.run / "model" / "config.json").is_file():
            self.status = "done"
            self._cleanup(keep_run=True)
            return
        self.status = "failed"
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-6:] \
            if self.log_path.is_file() else []
        self.error = "\n".join(line for line in tail if line.strip()) or f"training exited with code {rc}"
        self._cleanup(keep_run=False)

    def _cleanup(self, keep_run: bool) -> None:
        run = self.project.runs / self.run
        if not keep_run and run.exists():
            self.project.to_trash(run)
        (self.project.root / LOCK).unlink(missing_ok=True)

    def _read_events(self) -> None:
        try:
            with open(self.events_path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind("\n") + 1  # a line still being written waits for the next poll
        self._offset += len(chunk[:end].encode("utf-8"))
        for line in chunk[:end].splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("kind")
            if kind == "plan":
                self._state["plan"] = ev.get("lines", [])
                self._state["estimate_s"] = ev.get("estimate_s")
            elif kind == "progress":
                self._state["phase"] = ev.get("task")
                self._state["progress"] = {"done": ev.get("done"), "total": ev.get("total")}
            elif kind == "race_line":  # the race as it goes, below the plan
                self._state["plan"] = [*self._state.get("plan", []), ev.get("line", "")]
            elif kind == "step":
                phase = str(ev.get("phase", ""))
                self._state["phase"] = ("Fine-tuning" if phase == "finetune" else
                                        f"Racing: {phase[5:]}" if phase.startswith("race ") else "Training the head")
                self._state["progress"] = {"done": ev.get("global_step"), "total": ev.get("max_steps")}
            elif kind == "history" and not any(str(r.get("phase", "")).startswith("race ")
                                               for r in ev.get("rows", [])):  # a rung's own rows are not the run's
                self._state["history"] = ev.get("rows", [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def start_training(project: Project, budget_s: float, backbone: str = DEFAULT_BACKBONE,
                   mode: str = "auto") -> TrainingJob:
    """Start ``transferlab train PROJECT/data --out PROJECT/runs/<new> --time-limit <budget>``.

    Raises:
        ConfigError: a training of this project is already running."""
    lock = project.root / LOCK
    if lock.is_file():
        try:
            pid = int(lock.read_text().split()[0])
        except (ValueError, IndexError):
            pid = 0
        if pid and _alive(pid):
            raise ConfigError("a training of this project is already running; wait for it or cancel it first.")
    run = project.new_run_name()
    (project.runs / run).mkdir()
    events = project.runs / run / "events.jsonl"
    log = project.runs / run / "train.log"
    cmd = [sys.executable, "-m", "transferlab.cli", "train", str(project.data), "--out", str(project.runs / run),
           "--overwrite", "--time-limit", f"{budget_s:g}", "--backbone", backbone, "--mode", mode, "-q"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, EVENTS_ENV: str(events), "COLUMNS": "120"})
    lock.write_text(f"{process.pid} {run}\n")
    return TrainingJob(project, run, budget_s, process, events, log)
