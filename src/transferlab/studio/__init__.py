"""transferlab studio: the whole job in a browser page, offline (``transferlab studio PROJECT``)."""

from .app import create_studio, run_studio

__all__ = ["create_studio", "run_studio"]
