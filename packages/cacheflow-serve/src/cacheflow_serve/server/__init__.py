"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the runtime's async engines
(``EngineCoreClient``: the engine in a process of its own; ``AsyncLLMEngine``: in a thread)."""

from cacheflow_serve.server.app import CorsPolicy, build_app
from cacheflow_serve.server.launcher import ServerThread, make_server

__all__ = ["CorsPolicy", "ServerThread", "build_app", "make_server"]
