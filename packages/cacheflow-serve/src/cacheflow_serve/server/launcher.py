"""Running the server: ``cacheflow serve`` and an in-process server thread.

Shutdown (SIGTERM or SIGINT): the server stops accepting connections and new requests (503),
lets in-flight requests run for ``shutdown_grace_period`` seconds, then aborts the rest. Every
open stream still ends properly: aborted choices get a final chunk whose finish_reason is
"abort", then ``data: [DONE]``, and the connection closes. uvicorn then runs the app's
shutdown, the engine thread stops, and the process exits (uvicorn re-raises the signal, so the
exit status is that of the signal).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Optional

import uvicorn

from cacheflow_runtime import AsyncLLMEngine
from cacheflow_serve.server.app import DEFAULT_MAX_REQUEST_BYTES, build_app

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, starting the engine's graceful shutdown as soon as a signal comes."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine,
                 grace_period: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_period = grace_period
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain: Optional[asyncio.Future[None]] = None

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._drain is None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            logger.info("shutting down: %.1f s grace for %d in-flight requests",
                        self.grace_period, self.engine.num_in_flight)
            self._drain = asyncio.ensure_future(self.engine.shutdown(self.grace_period))


def make_server(engine: AsyncLLMEngine, *, host: str = "127.0.0.1", port: int = 8000,
                api_key: Optional[str] = None,
                served_model_names: Optional[Sequence[str]] = None,
                shutdown_grace_period: float = 5.0, log_level: str = "info",
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> uvicorn.Server:
    """A uvicorn server of the app over ``engine`` (run it with ``.run()``)."""
    app = build_app(engine, served_model_names=served_model_names, api_key=api_key,
                    max_request_bytes=max_request_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_grace_period) + 5,
                            timeout_keep_alive=5)
    return _Server(config, engine, shutdown_grace_period)


class ServerThread:
    """Runs a uvicorn server in a background thread (tests, notebooks); ``stop()`` shuts it
    down gracefully. Bind port 0 to get a free port, read back as ``port``."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((server.config.host, server.config.port))
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="cacheflow-server", daemon=True)

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.server.config.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self._socket]))

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Starts the thread and waits until the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Asks the server to exit (as a signal would) and waits for the thread."""
        self.server.handle_exit(0, None)
        self._thread.join(timeout)
