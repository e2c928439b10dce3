"""Every ``LLM`` keyword has a ``cacheflow serve`` flag (vLLM's name), and the flags reach LLM.

The keyword list comes from ``LLM.__init__``'s signature: a keyword added to LLM fails this test
until it gets a flag (in ``engine_args``; ``RENAMED_FLAGS`` holds the flags whose name is not
the keyword's).
"""

from __future__ import annotations

import argparse
import inspect

import pytest

from cacheflow_serve import LLM
from cacheflow_serve.cli import build_parser
from cacheflow_serve.engine_args import RENAMED_FLAGS, flag_for, llm_kwargs

# vLLM's names for the keywords whose flag differs from the keyword.
VLLM_NAMES = {"kv_cache_blocks": "--num-gpu-blocks-override"}


def _llm_keywords() -> list[str]:
    params = inspect.signature(LLM.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """flag -> dest of every optional argument."""
    return {flag: a.dest for a in parser._actions for flag in a.option_strings}


def test_every_llm_keyword_has_a_serve_flag_with_vllms_name() -> None:
    keywords = _llm_keywords()
    assert "gpu_memory_utilization" in keywords and "block_size" in keywords  # sanity
    flags = _flags(_serve_parser())
    missing = [k for k in keywords if flag_for(k) not in flags]
    assert missing == [], f"LLM keywords without a cacheflow serve flag: {missing}"
    for keyword in keywords:
        assert flags[flag_for(keyword)] == keyword
    assert RENAMED_FLAGS == VLLM_NAMES
    for keyword in set(keywords) - set(VLLM_NAMES):
        assert flag_for(keyword) == "--" + keyword.replace("_", "-")


def test_flags_become_llm_keywords_with_their_values() -> None:
    args = build_parser().parse_args([
        "serve", "some/model", "--gpu-memory-utilization", "0.5", "--block-size", "32",
        "--max-num-batched-tokens", "4096", "--swap-space", "2.5", "--preemption-mode", "swap",
        "--max-num-seqs", "7", "--max-model-len", "128", "--dtype", "bfloat16", "--seed", "3",
        "--enforce-eager", "--num-gpu-blocks-override", "99", "--device", "cpu",
        "--generation-config", "vllm", "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill", "--no-async-scheduling", "--kv-cache-dtype", "fp8",
        "-tp", "2",
        "--distributed-executor-backend", "ray", "--tokenizer", "other/tok",
        "--skip-tokenizer-init", "--trust-remote-code", "--no-disable-log-stats",
        "--logprobs-mode", "processed_logits"])
    assert llm_kwargs(args) == {
        "enable_prefix_caching": False, "enable_chunked_prefill": False,
        "async_scheduling": False,
        "kv_cache_dtype": "fp8", "tensor_parallel_size": 2, "distributed_executor_backend": "ray",
        "tokenizer": "other/tok", "skip_tokenizer_init": True,
        "gpu_memory_utilization": 0.5, "block_size": 32, "max_num_batched_tokens": 4096,
        "swap_space": 2.5, "preemption_mode": "swap", "max_num_seqs": 7,
        "max_model_len": 128, "dtype": "bfloat16", "seed": 3, "enforce_eager": True,
        "kv_cache_blocks": 99, "device": "cpu", "generation_config": "vllm",
        "trust_remote_code": True, "disable_log_stats": False,
        "logprobs_mode": "processed_logits"}
    assert set(llm_kwargs(args)) == set(_llm_keywords())


def test_left_out_flags_leave_llms_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert llm_kwargs(args) == {}
    old = build_parser().parse_args(["serve", "--kv-cache-blocks", "12"])  # the older spelling
    assert llm_kwargs(old) == {"kv_cache_blocks": 12}


def test_help_states_llms_defaults() -> None:
    """Each flag's "(default: X)" matches LLM's signature where X is a literal value."""
    defaults = {p.name: p.default for p in inspect.signature(LLM.__init__).parameters.values()}
    checked = 0
    for action in _serve_parser()._actions:
        if action.dest not in defaults or not action.help or "(default: " not in action.help:
            continue
        stated = action.help.rsplit("(default: ", 1)[1].split(")")[0].split(" ")[0]
        if stated.replace(".", "", 1).isdigit() or stated in ("auto", "recompute"):
            assert stated == str(defaults[action.dest]).removesuffix(".0"), action.dest
            checked += 1
    assert checked >= 6


def test_generate_takes_the_engine_flags_too(tiny_path: object,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cacheflow_serve.cli import main

    code = main(["generate", "--model", str(tiny_path), "--device", "cpu", "--block-size", "9",
                 "hi"])
    assert code == 2
    assert "block_size must be 8, 16 or 32, got 9" in capsys.readouterr().err


def test_batch_limits_left_out_take_the_devices_defaults(monkeypatch: pytest.MonkeyPatch,
                                                         tiny_path: object) -> None:
    """LLM's offline limits and the server's smaller budget, each only where not given."""
    from types import SimpleNamespace

    import torch

    from cacheflow_runtime import config as runtime_config
    from cacheflow_runtime.config import BatchLimits, resolve_batch_limits
    from cacheflow_serve.engine_process import with_serving_batch_limits

    config = LLM(tiny_path, device="cpu", dtype="float32").engine.scheduler_config
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (256, 2048)
    cpu = torch.device("cpu")
    assert resolve_batch_limits(cpu, None, None, True) == (256, 2048)
    assert resolve_batch_limits(cpu, 4096, None, True) == (4096, 4096)  # budget >= seqs
    assert resolve_batch_limits(cpu, 8, 100, True) == (8, 100)
    assert resolve_batch_limits(cpu, None, None, False) == (256, None)  # max_model_len rule
    big = BatchLimits(1024, 16384)
    monkeypatch.setattr(runtime_config, "default_batch_limits",
                        lambda device, serving=False: big)
    assert resolve_batch_limits(cpu, None, None, True) == (1024, 16384)
    assert resolve_batch_limits(cpu, 64, None, True) == (64, 16384)
    monkeypatch.undo()

    assert with_serving_batch_limits({"device": "cpu"}) == {"device": "cpu",
                                                           "max_num_batched_tokens": 2048}
    assert with_serving_batch_limits({"device": "cpu", "max_num_seqs": 3000}) == {
        "device": "cpu", "max_num_seqs": 3000, "max_num_batched_tokens": 3000}
    given = {"device": "cpu", "max_num_batched_tokens": 512}
    assert with_serving_batch_limits(given) is given
    unchunked = {"device": "cpu", "enable_chunked_prefill": False}
    assert with_serving_batch_limits(unchunked) is unchunked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA H200",
                                                       total_memory=140 * 1024**3))
    assert with_serving_batch_limits({"device": "cuda"})["max_num_batched_tokens"] == 8192
