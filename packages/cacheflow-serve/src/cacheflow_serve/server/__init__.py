"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the runtime's AsyncLLMEngine."""

from cacheflow_serve.server.app import build_app
from cacheflow_serve.server.launcher import ServerThread, make_server

__all__ = ["ServerThread", "build_app", "make_server"]
