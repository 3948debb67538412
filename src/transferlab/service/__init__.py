"""The prediction service (FastAPI + uvicorn) and its web page."""

from .app import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, app_from_env, create_app, serve

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "app_from_env", "create_app", "serve"]
