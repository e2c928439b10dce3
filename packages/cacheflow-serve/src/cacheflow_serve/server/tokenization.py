"""Tokenizer work off the event loop: threads for ordinary texts, a worker process for huge ones.

An HF tokenizer holds the GIL for long stretches on a big text (turning millions of ids into
Python objects), and so does ``json.dumps`` of millions of ids: from a thread, that would
still stall the event loop (``/health`` included) for up to a second. Texts of at least
``PROCESS_MIN_CHARS`` characters are therefore tokenized in a worker process (started on first
use, spawned so that it inherits no threads or CUDA state), which hands back the ids as packed
bytes, or as JSON text for ``/tokenize``. Everything else (short texts, chat templates,
detokenization) runs in a small thread pool.
"""

from __future__ import annotations

import array
import asyncio
import functools
import json
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Optional, TypeVar

T = TypeVar("T")

#: Texts from this many characters on are tokenized in the worker process.
PROCESS_MIN_CHARS = 256 * 1024
TOKENIZER_THREADS = 2
_IDS_TYPECODE = "q"

_worker_tokenizer: Any = None  # set in the worker process by _init_worker


def _init_worker(tokenizer_pickle: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = pickle.loads(tokenizer_pickle)


def _encode_packed(text: str, add_special_tokens: bool) -> bytes:
    """(In the worker) the token ids of ``text`` as packed signed 64-bit integers."""
    ids = _worker_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return array.array(_IDS_TYPECODE, ids).tobytes()


def _encode_json(text: str, add_special_tokens: bool) -> tuple[int, str]:
    """(In the worker) the number of tokens of ``text`` and their JSON list."""
    ids = _worker_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return len(ids), json.dumps(ids, separators=(",", ":"))


class Tokenization:
    """Runs one tokenizer's work off the event loop (see the module docstring)."""

    def __init__(self, tokenizer: Any, process_min_chars: int = PROCESS_MIN_CHARS) -> None:
        self.tokenizer = tokenizer
        self.process_min_chars = process_min_chars
        self._threads = ThreadPoolExecutor(TOKENIZER_THREADS,
                                           thread_name_prefix="cacheflow-tokenizer")
        self._process: Optional[ProcessPoolExecutor] = None
        self._lock = threading.Lock()

    async def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run in the tokenizer threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    def _worker(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._process is None:
                self._process = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(pickle.dumps(self.tokenizer),))
            return self._process

    async def _in_worker(self, fn: Callable[[str, bool], T], text: str,
                         add_special_tokens: bool) -> T:
        loop = asyncio.get_running_loop()
        worker = await self.in_thread(self._worker)  # pickling the tokenizer takes a while
        return await loop.run_in_executor(worker, fn, text, add_special_tokens)

    def _encode_here(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text`` (``tokenizer.encode``; ``add_special_tokens=False`` for a
        rendered chat template, which holds them already)."""
        if len(text) < self.process_min_chars:
            return await self.in_thread(self._encode_here, text, add_special_tokens)
        packed = await self._in_worker(_encode_packed, text, add_special_tokens)
        return array.array(_IDS_TYPECODE, packed).tolist()

    async def encode_json(self, text: str, add_special_tokens: bool = True) -> tuple[int, str]:
        """(number of tokens, their JSON list) of ``text``, for a response body."""
        if len(text) < self.process_min_chars:
            ids = await self.in_thread(self._encode_here, text, add_special_tokens)
            return len(ids), json.dumps(ids, separators=(",", ":"))
        return await self._in_worker(_encode_json, text, add_special_tokens)

    def shutdown(self) -> None:
        """Stops the threads and the worker process (pending work is cancelled). The worker is
        joined (at most one encoding in progress to wait for): a process left to exit on its
        own makes the interpreter's resource tracker warn of leaked semaphores at exit."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._process is not None:
            self._process.shutdown(wait=True, cancel_futures=True)
