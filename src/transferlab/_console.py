"""The terminal: one console for stdout and one for stderr, shared by the CLI, the log and the progress bars.

On a terminal, text wraps at its width. In a pipe or a log file there is no width to wrap at: every
message, error, warning and path is written as one logical line (rich's soft wrap), whatever
``COLUMNS`` says, and tables are as wide as their content up to :data:`PIPE_WIDTH` columns.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

__all__ = ["out", "err", "PIPE_WIDTH", "log_handler"]

#: Width of tables and progress bars written to a pipe or a file (their content decides, up to this).
PIPE_WIDTH = 200


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _console(stderr: bool) -> Console:
    tty = _is_tty(sys.stderr if stderr else sys.stdout)
    return Console(stderr=stderr, width=None if tty else PIPE_WIDTH, soft_wrap=not tty)


out = _console(stderr=False)
err = _console(stderr=True)


class _LineHandler(logging.Handler):
    """``level: message``, one line per record, never wrapped (the log handler in a pipe)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = Text(f"{record.levelname.lower()}: ", style="bold" if record.levelno >= logging.WARNING else "")
            line.append(self.format(record))
            err.print(line, soft_wrap=True, highlight=False)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def log_handler() -> logging.Handler:
    """rich's handler (levels in a column, wrapped to the width) on a terminal; plain lines elsewhere."""
    if err.is_terminal and not err.soft_wrap:
        return RichHandler(console=err, show_time=False, show_path=False, markup=False)
    return _LineHandler()
