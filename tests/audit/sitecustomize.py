"""Loaded by every Python process the distributed tests start (``PYTHONPATH`` names this folder): records
what the process writes under ``TL_AUDIT_DIR`` (opening a file to write, renaming into it, making or
removing a folder there) with Python's audit hooks, and at exit writes the list to
``TL_AUDIT_LOG/<rank>-<pid>.json`` (rank from the launcher's environment), so a test can see which
rank wrote what."""

import atexit
import json
import os
import sys

_ROOT = os.environ.get("TL_AUDIT_DIR")
_LOG = os.environ.get("TL_AUDIT_LOG")
_WRITES: list = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _target(path) -> str | None:
    if isinstance(path, int):
        return None
    path = os.path.abspath(os.fsdecode(path))
    return path if path == _ROOT or path.startswith(_ROOT + os.sep) else None


def _hook(event: str, args: tuple) -> None:
    path = None
    if event == "open":
        name, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        path = name if writing else None
    elif event in ("os.rename", "os.replace"):
        path = args[1]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        path = args[0]
    if path is not None and not isinstance(path, int):
        target = _target(path)
        if target is not None:
            _WRITES.append([event, target])


def _dump() -> None:
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    with open(os.path.join(_LOG, f"{rank}-{os.getpid()}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": int(rank), "argv": sys.argv, "writes": list(_WRITES)}, f)


if _ROOT and _LOG:
    _ROOT = os.path.abspath(_ROOT)
    sys.addaudithook(_hook)
    atexit.register(_dump)
