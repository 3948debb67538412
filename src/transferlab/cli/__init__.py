"""The command line: argument parsing only; every command calls the library (``main`` is the entry point)."""

from .main import app, main, parse_duration

__all__ = ["app", "main", "parse_duration"]
