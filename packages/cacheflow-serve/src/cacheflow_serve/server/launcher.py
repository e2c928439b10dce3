"""Running the server: ``cacheflow serve`` and an in-process server thread.

Shutdown (SIGTERM or SIGINT): the server closes its listening socket at once, so new
connections are refused; idle keep-alive connections are closed, and a request that still
reaches the app gets 503 (``service_unavailable``). In-flight requests run for up to
``shutdown_grace_period`` seconds, then are aborted. Every open stream still ends properly:
aborted choices get a final chunk whose finish_reason is "abort", then ``data: [DONE]``, and the
connection closes. The engine thread stops and ``cacheflow serve`` exits with status 0 as soon
as nothing is in flight (within a second when nothing was). A second SIGINT forces an
immediate exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from types import FrameType
from typing import Any, Optional

import uvicorn

from cacheflow_runtime import BaseAsyncEngine
from cacheflow_serve.server.app import DEFAULT_MAX_REQUEST_BYTES, CorsPolicy, build_app

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, starting the engine's graceful shutdown as soon as a signal comes."""

    def __init__(self, config: uvicorn.Config, engine: BaseAsyncEngine,
                 grace_period: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_period = grace_period
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain: Optional[asyncio.Future[None]] = None

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's signal capture, without re-raising the signal once the server has shut
        down: a completed graceful shutdown exits with status 0, not by the signal."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._drain is None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            logger.info("shutting down: %.1f s grace for %d in-flight requests",
                        self.grace_period, self.engine.num_in_flight)
            self._drain = asyncio.ensure_future(self.engine.shutdown(self.grace_period))


def make_server(engine: BaseAsyncEngine, *, host: str = "127.0.0.1", port: int = 8000,
                api_key: Optional[str] = None,
                served_model_names: Optional[Sequence[str]] = None,
                shutdown_grace_period: float = 5.0, log_level: str = "info",
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                generation_defaults: Optional[Mapping[str, Any]] = None,
                cors: Optional[CorsPolicy] = None, chat_template: Optional[str] = None,
                trust_request_chat_template: bool = False) -> uvicorn.Server:
    """A uvicorn server of the app over ``engine`` (run it with ``.run()``);
    ``generation_defaults``, ``cors`` and the chat template options as for ``build_app``."""
    app = build_app(engine, served_model_names=served_model_names, api_key=api_key,
                    max_request_bytes=max_request_bytes, generation_defaults=generation_defaults,
                    cors=cors, chat_template=chat_template,
                    trust_request_chat_template=trust_request_chat_template)
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
