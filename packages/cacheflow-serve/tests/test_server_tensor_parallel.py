"""`cacheflow serve --tensor-parallel-size 2` on CPU answers the official OpenAI client with the
tokens of a single process (the ranks spawned by the engine core process), and SIGTERM leaves no
process behind; bad sizes are refused up front."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.cli import build_parser
from cacheflow_serve.engine_args import llm_kwargs

from serve_testutil import alive, descendants

PROMPT = "Tensor parallel"
# Startup spawns two workers that import torch and load the model: generous on a busy machine.
STARTUP_S = 180
EXIT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tp2_server_answers_the_openai_client(chat_tiny_path: Path, llm: LLM) -> None:
    # chat_tiny_path: the weights of tiny_path (which ``llm`` serves) plus a chat template
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8,
                                                     ignore_eos=True), use_tqdm=False)[0]
    port = _free_port()
    cmd = [sys.executable, "-m", "cacheflow_serve", "serve", str(chat_tiny_path),
           "--port", str(port), "--served-model-name", "tiny", "--device", "cpu",
           "--dtype", "float32",
           "--kv-cache-blocks", "256", "--tensor-parallel-size", "2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        workers = descendants(proc.pid)
        # the engine core, its two ranks (and multiprocessing's resource tracker)
        assert len(workers) >= 3
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == expected.outputs[0].text
        assert completion.usage is not None and completion.usage.completion_tokens == 8
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
            temperature=0)
        assert chat.choices[0].finish_reason in ("length", "stop")
        proc.send_signal(signal.SIGTERM)
        proc.wait(EXIT_S)
        deadline = time.monotonic() + EXIT_S
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_tensor_parallel_size_is_refused(tiny_path: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's "
                                         "4 attention heads"):
        LLM(tiny_path, device="cpu", dtype="float32", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        LLM(tiny_path, device="cpu", tensor_parallel_size=2, distributed_executor_backend="x")


def test_cli_parallel_options() -> None:
    parser = build_parser()
    gen = parser.parse_args(["generate", "--tensor-parallel-size", "2",
                             "--distributed-executor-backend", "ray", "hi"])
    assert (gen.tensor_parallel_size, gen.distributed_executor_backend) == (2, "ray")
    serve = parser.parse_args(["serve", "m", "-tp", "4"])
    # Left out, an engine option is not passed (LLM's default applies).
    assert llm_kwargs(serve) == {"tensor_parallel_size": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--distributed-executor-backend", "slurm"])
