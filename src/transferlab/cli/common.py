"""Shared pieces of the command line: consoles, logging set-up, JSON printing, option parsing."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .._console import err, log_handler, out

__all__ = ["out", "err", "setup_logging", "print_json", "csv_ints", "whole_names", "process_started_at"]


def process_started_at() -> float:
    """The wall-clock time this process started, which is when the user's clock started: on Linux from
    ``/proc`` (its start in clock ticks after the boot time), elsewhere now. Importing torch, Lightning
    and timm from a cold disk can take minutes before ``transferlab train`` runs a line of its own, and
    the user's ``--time-limit`` counts them (BENCHMARKS.md, "Figures behind the defaults")."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), 20th after the name
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return time.time()
    now = time.time()
    return started if now - 86_400 < started <= now else now  # a clock changed since boot: trust only now



def setup_logging(quiet: bool) -> None:
    log = logging.getLogger("transferlab")
    log.handlers[:] = [log_handler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def csv_ints(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 1024,1024, got {text!r}") from None




def whole_names(table: Table, *columns: int) -> Table:
    """Never cut the names in ``columns`` (an 80-column terminal or a pipe would end them in '…'): they
    keep their longest cell's width and the other columns wrap instead."""
    for i, col in enumerate(table.columns):
        if i in columns:
            col.no_wrap, col.overflow = True, "ignore"
            col.min_width = max([len(str(c)) for c in col._cells] + [len(str(col.header))])
        else:
            col.overflow = "fold"
    return table
