"""Progress bars for long work (rich), silenced by ``quiet``."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ._console import err
from .events import emit

__all__ = ["progress_bar"]


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None, description: str = "", total: int = 0) -> None:
        self._p, self._t = progress, task
        self.description, self.total, self.done = description, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        emit("progress", every_s=0 if self.done >= self.total else 0.25, task=self.description, done=self.done,
             total=self.total)
        if self._p is not None and self._t is not None:
            self._p.advance(self._t, n)


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[_Bar]:
    """A progress bar on stderr with count, elapsed and remaining time; a no-op when ``quiet`` or total is 0.
    Progress also goes to the events file when one is set (:mod:`transferlab.events`), quiet or not."""
    if quiet or total <= 0:
        yield _Bar(None, None, description, total)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as p:
        task = p.add_task(description, total=total)
        yield _Bar(p, task, description, total)
