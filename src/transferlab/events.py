"""Progress events for a watcher (the studio): JSON lines appended to the file named by the environment
variable ``TRANSFERLAB_EVENTS``; nothing at all when it is unset.

Each line is ``{"t": unix time, "kind": ..., ...}``: ``plan`` (the plan's lines and estimate),
``progress`` (a long task's ``done`` of ``total``), ``step`` (a training batch), ``history`` (the
epoch rows so far), ``race`` (a rung of the race of training recipes starting or done, with its
validation accuracy) and ``race_line`` (the race's printed lines). Frequent kinds are throttled to a few lines a second.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["emit", "EVENTS_ENV"]

EVENTS_ENV = "TRANSFERLAB_EVENTS"
_last: dict[str, float] = {}


def emit(kind: str, *, every_s: float = 0.0, **fields: Any) -> None:
    """Append one event; with ``every_s``, at most one event of this ``kind`` per that many seconds."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    now = time.time()
    if every_s and now - _last.get(kind, 0.0) < every_s:
        return
    _last[kind] = now
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": now, "kind": kind, **fields}, default=str) + "\n")
    except OSError:  # a watcher's file is never a reason to stop training
        pass
