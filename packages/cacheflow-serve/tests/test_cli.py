"""The ``cacheflow generate`` command prints what the LLM API generates for the same prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_serve.cli import main

ONE_TORCH_THREAD = True  # see conftest.py
MAX_TOKENS = 8


def _args(model: Path | str, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--max-tokens", str(MAX_TOKENS), "--device", "cpu",
            "--dtype", "float32", *extra]


def _expected(llm: LLM, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def test_generate_prints_the_greedy_completion(llm: LLM, tiny_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_path, "Hello")) == 0
    out = capsys.readouterr().out
    text = _expected(llm, "Hello")
    assert text  # the tiny model does produce something
    assert out == text + "\n"


def test_generate_two_prompts_prints_both_with_headers(
        llm: LLM, tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_path, "Hello", "The quick brown fox")) == 0
    out = capsys.readouterr().out
    assert out == (f"### Hello\n{_expected(llm, 'Hello')}\n"
                   f"### The quick brown fox\n{_expected(llm, 'The quick brown fox')}\n")


def test_generate_with_sampling_options(llm: LLM, tiny_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tiny_path, "--temperature", "0.9", "--top-p", "0.8", "--seed", "7", "Hello")
    assert main(args) == 0
    params = SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=MAX_TOKENS)
    want = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == want + "\n"
    assert want != _expected(llm, "Hello")  # the options were really used


def test_chat_uses_the_models_chat_template(llm: LLM, chat_tiny_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(chat_tiny_path, "--chat", "Hello")) == 0
    out = capsys.readouterr().out
    # The fixture's template wraps the message; the weights are those of ``llm``.
    templated = "<|user|>Hello\n<|assistant|>"
    assert out == _expected(llm, templated) + "\n"
    assert out != _expected(llm, "Hello") + "\n"


def test_chat_without_a_chat_template_is_a_clear_error(tiny_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_path, "--chat", "Hello")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cacheflow: error: ")
    assert "this model's tokenizer has no chat template" in captured.err


def test_missing_model_path_exits_2_naming_it(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    assert main(_args(missing, "Hello")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"cacheflow: error: model path {str(missing)!r} does not exist\n"


def test_missing_tokenizer_path_is_named_as_the_tokenizer(
        tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-tokenizer"
    assert main(["generate", "--model", str(tiny_path), "--device", "cpu", "--tokenizer",
                 str(missing), "Hello"]) == 2
    assert capsys.readouterr().err == \
        f"cacheflow: error: tokenizer path {str(missing)!r} does not exist\n"


def test_invalid_option_value_exits_2_naming_it(tiny_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_path), "--max-tokens", "0", "Hello"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "SamplingParams.max_tokens must be an integer >= 1" in captured.err


def test_prompt_too_long_for_the_model_exits_2(tiny_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_path, "x" * 300)) == 2
    assert "more than max_model_len (256)" in capsys.readouterr().err


def test_enforce_eager_flag_is_accepted_and_changes_nothing_on_cpu(
        llm: LLM, tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CUDA graphs exist only on CUDA: on the CPU both modes print the same completion."""
    assert main(_args(tiny_path, "--enforce-eager", "Hello")) == 0
    assert capsys.readouterr().out == _expected(llm, "Hello") + "\n"
    assert not llm.engine.uses_cuda_graphs


def test_generate_with_an_fp8_kv_cache(tiny_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    fp8 = LLM(tiny_path, device="cpu", dtype="float32", kv_cache_dtype="fp8")
    assert fp8.engine.cache_config.cache_dtype == "fp8"
    assert main(_args(tiny_path, "--kv-cache-dtype", "fp8_e4m3", "Hello")) == 0
    assert capsys.readouterr().out == _expected(fp8, "Hello") + "\n"


def test_unknown_kv_cache_dtype_is_a_clear_error(tiny_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_path, "--kv-cache-dtype", "int4", "Hello")) == 2
    assert "kv_cache_dtype must be one of ('auto', 'fp8', 'fp8_e4m3'), got 'int4'" in \
        capsys.readouterr().err


def test_serve_cors_flags_take_json_lists() -> None:
    """vLLM's CORS flags: JSON lists, any origin / method / header by default."""
    from cacheflow_serve.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--allowed-origins",
                                      '["https://a.example", "http://localhost:3000"]',
                                      "--allow-credentials"])
    assert args.allowed_origins == ["https://a.example", "http://localhost:3000"]
    assert (args.allowed_methods, args.allowed_headers, args.allow_credentials) == (
        ["*"], ["*"], True)


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "99999", "argument --port: must be a port in [0, 65535], got 99999"),
    ("--port", "-1", "argument --port: must be a port in [0, 65535], got -1"),
    ("--shutdown-grace-period", "-1",
     "argument --shutdown-grace-period: must be a finite number of seconds >= 0, got -1"),
    ("--shutdown-grace-period", "inf",
     "argument --shutdown-grace-period: must be a finite number of seconds >= 0, got inf"),
    ("--max-queued-requests", "0", "argument --max-queued-requests: must be an integer >= 1, "
                                   "got 0"),
    ("--max-queued-requests", "-3", "argument --max-queued-requests: must be an integer >= 1, "
                                    "got -3"),
    ("--allowed-origins", "https://a.example",
     "argument --allowed-origins: must be a JSON list of strings, e.g. "
     "'[\"https://example.com\"]', got 'https://a.example'"),
    ("--allowed-methods", "[1]", "argument --allowed-methods: must be a JSON list of strings, "
                                 "e.g. '[\"https://example.com\"]', got '[1]'"),
])
def test_serve_refuses_out_of_range_flags_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
        message: str) -> None:
    """A usage error (status 2) from the parser: the model path, which does not exist, is never
    looked at."""
    with pytest.raises(SystemExit) as info:
        main(["serve", str(tmp_path / "no-such-model"), f"{flag}={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"cacheflow serve: error: {message}\n" in err
    assert "no-such-model" not in err


def test_serve_refuses_a_port_in_use_before_loading(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The listening socket is bound before the model loads (as vLLM does): a port in use is a
    one-line error at once, even with a model path that does not exist."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", str(tmp_path / "no-such-model"), "--host", "127.0.0.1",
                     "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "no-such-model" not in err
    assert main(["serve", str(tmp_path / "m"), "--host", "no-such-host.invalid",
                 "--port", "0"]) == 2
    assert "cannot listen on no-such-host.invalid:0" in capsys.readouterr().err
