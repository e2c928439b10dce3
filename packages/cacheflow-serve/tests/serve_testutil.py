"""Helpers shared by the cacheflow-serve tests (imported by the test modules, not a conftest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cacheflow_runtime import AsyncLLMEngine, RequestOutput
from cacheflow_serve import LLM
from cacheflow_serve.server import ServerThread, make_server

#: For a ``cacheflow serve`` subprocess: torch on one thread in the server and its engine core
#: process (the tiny model gains nothing from more; see ONE_TORCH_THREAD in conftest.py).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}

# A chat template for the byte tokenizer (which ships none), so that ``--chat`` can be tested.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def assert_idle(llm: LLM) -> None:
    """No request is left in the engine and every KV block (GPU and CPU) is free."""
    engine = llm.engine
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert bm.get_num_free_gpu_blocks() == bm.num_total_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_total_cpu_blocks


def completions(outputs: list[RequestOutput]) -> list[list[tuple[list[int], str, str | None]]]:
    """(token ids, text, finish reason) of every returned sequence of every request."""
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for out in outputs]


def _stat_fields(pid_dir: Path) -> list[str]:
    return pid_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie does not)."""
    try:
        return _stat_fields(Path(f"/proc/{pid}"))[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            fields = _stat_fields(pid_dir)
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(pid_dir.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@contextlib.contextmanager
def server_in_thread(path: Path, llm_kwargs: dict[str, Any] | None = None,
                     **server_kwargs: Any) -> Iterator[ServerThread]:
    """The server over an ``LLM(path, device="cpu", dtype="float32", **llm_kwargs)``'s engine in
    this process, serving the model as "tiny" (``server_kwargs`` go to ``make_server``)."""
    llm = LLM(path, device="cpu", dtype="float32", **(llm_kwargs or {}))
    server_kwargs = {"port": 0, "served_model_names": ["tiny"], "log_level": "warning",
                     **server_kwargs}
    thread = ServerThread(make_server(AsyncLLMEngine(llm.engine), **server_kwargs)).start()
    try:
        yield thread
    finally:
        thread.stop()
