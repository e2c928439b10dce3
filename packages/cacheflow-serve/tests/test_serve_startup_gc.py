"""``cacheflow serve`` takes what lives as long as the server out of the cyclic garbage
collector's scans before it starts serving."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

import cacheflow_serve.server.launcher as launcher
from cacheflow_serve.cli import main


class _RecordingServer:
    """Stands in for the HTTP server: records the collector's state when it would start."""

    started = False  # run_serve then returns 1 instead of ending the process

    def __init__(self) -> None:
        self.frozen_at_start = -1

    def run(self, sockets: Any = None) -> None:
        self.frozen_at_start = gc.get_freeze_count()


def test_serve_freezes_the_startup_heap_before_serving(tiny_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    servers: list[_RecordingServer] = []

    def fake_make_server(engine: Any, **kwargs: Any) -> _RecordingServer:
        servers.append(_RecordingServer())
        return servers[-1]

    monkeypatch.setattr(launcher, "make_server", fake_make_server)
    gc.unfreeze()
    try:
        # In process (the engine core process freezes its own heap the same way).
        assert main(["serve", str(tiny_path), "--device", "cpu", "--kv-cache-blocks", "64",
                     "--port", "0", "--disable-frontend-multiprocessing"]) == 1
        assert len(servers) == 1
        # The model's modules and tensors, the tokenizer and the imports: many thousands.
        assert servers[0].frozen_at_start > 10_000
    finally:
        gc.unfreeze()
