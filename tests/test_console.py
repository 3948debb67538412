"""Output in a pipe or a log file: one logical line per message, whatever the terminal width says."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest


def _piped(*args: str, columns: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": columns, "LINES": "20"}
    return subprocess.run([sys.executable, "-m", "transferlab.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("columns", ["40", "300"])
def test_an_error_with_a_long_path_is_one_line_in_a_pipe(tmp_path, columns):
    missing = tmp_path / ("x" * 150) / ("y" * 60)
    p = _piped("train", str(missing), columns=columns)
    assert p.returncode == 2
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    hit = [line for line in lines if str(missing) in line]
    assert len(hit) == 1, p.stdout  # the whole path, uncut, on the error's own line
    assert hit[0].startswith("error: no such file or folder:") and hit[0].rstrip().endswith("path,label[,split].")
    assert len(lines) == 1, p.stdout


def test_log_lines_are_not_wrapped_in_a_pipe(tmp_path):
    code = ("import logging, sys\n"
            "from transferlab.cli.common import setup_logging\n"
            "setup_logging(False)\n"
            "logging.getLogger('transferlab').warning('class %r has only %d images: ' + 'word ' * 40, sys.argv[1], 3)\n")
    name = "a-class-name-" + "z" * 80
    p = subprocess.run([sys.executable, "-c", code, name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, env={**os.environ, "COLUMNS": "40"}, timeout=120)
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: class '{name}' has only 3 images: word"), p.stdout
    assert lines[0].rstrip().endswith("word word")


def test_a_terminal_keeps_rich_handler(monkeypatch):
    from rich.logging import RichHandler

    from transferlab import _console

    monkeypatch.setattr(_console.err, "soft_wrap", False)
    monkeypatch.setattr(_console.err, "_force_terminal", True)
    assert isinstance(_console.log_handler(), RichHandler)
    monkeypatch.setattr(_console.err, "soft_wrap", True)
    assert not isinstance(_console.log_handler(), RichHandler)
    assert isinstance(_console.log_handler(), logging.Handler)
