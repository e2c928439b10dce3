"""Stop strings, stop tokens, min_tokens and max_tokens end the text and tokens exactly where
they should; the incremental detokenizer gives the same text as decoding everything at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cacheflow_runtime import SamplingParams
from cacheflow_runtime.engine.detokenizer import decode_new_text
from cacheflow_runtime.sequence import Sequence
from cacheflow_serve import LLM

from serve_testutil import assert_idle

ONE_TORCH_THREAD = True  # see conftest.py
PROMPT = "The quick brown fox"
MAX_TOKENS = 40
EOS = 2


def _generate(llm: LLM, **kwargs: Any) -> Any:
    params = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    params.update(kwargs)
    out = llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    assert_idle(llm)
    return out.outputs[0]


@pytest.fixture(scope="module")
def reference(llm: LLM) -> Any:
    """The greedy continuation without any stop condition (top-5 logprobs per token)."""
    ref = _generate(llm, logprobs=5)
    assert len(ref.token_ids) == MAX_TOKENS
    assert ref.finish_reason == "length" and ref.stop_reason is None
    assert ref.text == llm.get_tokenizer().decode(ref.token_ids, skip_special_tokens=True)
    return ref


def _stop_string(text: str, length: int, skip: int = 0) -> tuple[int, str]:
    """(i, s): a printable-ASCII substring s of ``text`` whose first occurrence is at i > 0."""
    for i in range(1, len(text) - length + 1):
        s = text[i:i + length]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            if skip == 0:
                return i, s
            skip -= 1
    pytest.fail(f"no usable stop string of {length} characters in {text!r}")


def _first_new_token(ids: list[int], start: int) -> int:
    """The first position k >= start whose token appears nowhere before it (and is not EOS)."""
    for k in range(start, len(ids)):
        if ids[k] not in ids[:k] and ids[k] != EOS:
            return k
    pytest.fail(f"every token from position {start} on repeats an earlier one: {ids}")


@pytest.mark.parametrize("length", [1, 3])
def test_stop_string_cuts_the_text_before_it(llm: LLM, reference: Any, length: int) -> None:
    i, s = _stop_string(reference.text, length)
    out = _generate(llm, stop=[s])
    assert out.text == reference.text[:i]
    assert out.finish_reason == "stop"
    assert out.stop_reason == s
    # Generation ended on the token that completed the stop string.
    tokenizer = llm.get_tokenizer()
    assert out.token_ids == reference.token_ids[:len(out.token_ids)]
    assert tokenizer.decode(out.token_ids, skip_special_tokens=True) == reference.text[:i + len(s)]
    assert tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True) != \
        reference.text[:i + len(s)]


def test_stop_string_kept_with_include_stop_str_in_output(llm: LLM, reference: Any) -> None:
    i, s = _stop_string(reference.text, 3)
    out = _generate(llm, stop=[s], include_stop_str_in_output=True)
    assert out.text == reference.text[:i + len(s)]
    assert out.finish_reason == "stop"
    assert out.stop_reason == s
    assert out.token_ids == _generate(llm, stop=[s]).token_ids


def test_earliest_of_several_stop_strings_wins(llm: LLM, reference: Any) -> None:
    text = reference.text
    i, s = _stop_string(text, 2)
    later = next(text[j:j + 2] for j in range(i + 2, len(text) - 1)
                 if text[j:j + 2].isascii() and text.find(text[j:j + 2]) == j)
    absent = "\x07never\x07"
    assert absent not in text
    out = _generate(llm, stop=[absent, later, s])
    assert out.text == text[:i]
    assert out.stop_reason == s


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id_ends_generation_on_it(llm: LLM, reference: Any, include: bool) -> None:
    """The stop token stays in the token ids; its text only with include_stop_str_in_output
    (vLLM's rule)."""
    k = _first_new_token(reference.token_ids, 5)
    token = reference.token_ids[k]
    out = _generate(llm, stop_token_ids=[token], include_stop_str_in_output=include)
    assert out.token_ids == reference.token_ids[:k + 1]
    assert out.finish_reason == "stop"
    assert out.stop_reason == token
    shown = reference.token_ids[:k + 1] if include else reference.token_ids[:k]
    assert out.text == llm.get_tokenizer().decode(shown, skip_special_tokens=True)


def test_min_tokens_suppresses_an_early_stop_token(llm: LLM, reference: Any) -> None:
    k = _first_new_token(reference.token_ids, 3)
    token = reference.token_ids[k]
    min_tokens = k + 4
    out = _generate(llm, stop_token_ids=[token], min_tokens=min_tokens)
    ids = out.token_ids
    # Identical up to the stop token, which is masked while fewer than min_tokens exist: the
    # greedy choice there is the best other token (EOS is masked too).
    assert ids[:k] == reference.token_ids[:k]
    runner_up = max((t for t in reference.logprobs[k] if t not in (token, EOS)),
                    key=lambda t: reference.logprobs[k][t])
    assert ids[k] == runner_up
    assert len(ids) > k + 1
    assert token not in ids[:min_tokens] and EOS not in ids[:min_tokens]
    if out.finish_reason == "stop":
        assert ids[-1] == token and token not in ids[:-1] and len(ids) >= min_tokens
        assert out.stop_reason == token
    else:
        assert out.finish_reason == "length"
        assert len(ids) == MAX_TOKENS and token not in ids


@pytest.mark.parametrize("max_tokens", [1, 7, MAX_TOKENS])
def test_max_tokens_gives_exactly_that_many(llm: LLM, reference: Any, max_tokens: int) -> None:
    out = _generate(llm, max_tokens=max_tokens)
    assert out.token_ids == reference.token_ids[:max_tokens]
    assert out.finish_reason == "length"
    assert out.stop_reason is None
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["café", "日本語 ok", "é日本\U0001F600x", "naïve — ünïcödé ✓"])
def test_incremental_detokenizer_matches_full_decode(llm: LLM, text: str) -> None:
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    prompt = tokenizer.encode("Hi ")
    seq = Sequence(0, "Hi ", prompt, block_size=16)
    deltas = []
    for n, token in enumerate(ids, start=1):
        seq.append_token(token, {token: 0.0})
        deltas.append(decode_new_text(tokenizer, seq, skip_special_tokens=True))
        # Only whole characters come out: the bytes so far, less an unfinished character.
        assert seq.output_text == text.encode("utf-8")[:n].decode("utf-8", errors="ignore")
        assert "\ufffd" not in seq.output_text
    assert seq.output_text == "".join(deltas) == tokenizer.decode(ids) == text
    assert sum(1 for d in deltas if d) == len(text)  # one delta per character


def test_incremental_detokenizer_across_a_fork_and_a_special_token(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    first, rest = tokenizer.encode("日本"), tokenizer.encode("語!")
    seq = Sequence(0, None, tokenizer.encode("x"), block_size=16)
    for token in first[:4]:  # stops inside the second character
        seq.append_token(token, {token: 0.0})
        decode_new_text(tokenizer, seq, skip_special_tokens=True)
    assert seq.output_text == "日"
    child = seq.fork(1)  # as parallel sampling forks a sequence
    for token in first[4:] + [EOS] + rest:
        for s in (seq, child):
            s.append_token(token, {token: 0.0})
            decode_new_text(tokenizer, s, skip_special_tokens=True)
    assert seq.output_text == child.output_text == "日本語!"
    assert seq.output_text == tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(8))
def test_final_text_is_the_decode_of_all_tokens(llm: LLM, seed: int) -> None:
    """Random byte tokens end in the middle of a UTF-8 character now and then: the held-back
    bytes still belong in the final text, as in decoding all tokens at once."""
    out = _generate(llm, temperature=1.0, seed=seed, max_tokens=24)
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("n", [1, 3])
def test_detokenize_false_gives_the_same_tokens_and_no_text(llm: LLM, n: int) -> None:
    """``detokenize=False``: the token ids and logprobs of the detokenized run, empty texts
    (also for beams and seeded samples)."""
    kwargs: dict[str, Any] = ({"temperature": 0, "logprobs": 3} if n == 1 else
                              {"n": n, "temperature": 0.8, "seed": 7, "logprobs": 3})
    want = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, **kwargs),
                        use_tqdm=False)[0]
    got = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, detokenize=False,
                                              **kwargs), use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert [c.logprobs for c in got.outputs] == [c.logprobs for c in want.outputs]
    assert all(c.text for c in want.outputs)
    assert [c.text for c in got.outputs] == [""] * n
    beams = SamplingParams(n=2, best_of=2, use_beam_search=True, temperature=0, max_tokens=6,
                           ignore_eos=True, detokenize=False)
    out = llm.generate(PROMPT, beams, use_tqdm=False)[0]
    assert len(out.outputs) == 2 and all(c.text == "" and c.token_ids for c in out.outputs)
    assert_idle(llm)


def test_detokenize_false_refuses_stop_strings() -> None:
    with pytest.raises(ValueError, match=r"SamplingParams.stop must be None with "
                                         r"detokenize=False .*got \['x'\]"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="SamplingParams.detokenize must be True or False"):
        SamplingParams(detokenize=0)  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[5], detokenize=False).stop_token_ids == [5]


def _stream(llm: LLM, params: SamplingParams) -> Any:
    """The last output of a request stepped through the engine's streaming path."""
    engine = llm.engine
    engine.add_request("stream", PROMPT, params)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
    assert last is not None and last.finished
    return last.outputs[0]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("path", ["offline", "stream"])
def test_eos_text_is_left_out_unless_asked_for(llm: LLM, include: bool, path: str) -> None:
    """A sequence ended by EOS keeps the EOS id but not its text, even with special tokens kept
    (vLLM's rule), on the offline path (text built off the step loop) and the streaming one."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=3,
                            logit_bias={EOS: 100.0}, skip_special_tokens=False,
                            include_stop_str_in_output=include)
    out = (_generate(llm, **{k: getattr(params, k) for k in (
        "min_tokens", "logit_bias", "skip_special_tokens", "include_stop_str_in_output")},
        ignore_eos=False) if path == "offline" else _stream(llm, params))
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS
    assert out.finish_reason == "stop" and out.stop_reason is None
    tokenizer = llm.get_tokenizer()
    shown = out.token_ids if include else out.token_ids[:-1]
    assert out.text == tokenizer.decode(shown, skip_special_tokens=False)
    assert tokenizer.decode([EOS], skip_special_tokens=False) in out.text if include else \
        tokenizer.decode([EOS], skip_special_tokens=False) not in out.text


def test_stop_token_text_left_out_on_the_streaming_path(llm: LLM, reference: Any) -> None:
    k = _first_new_token(reference.token_ids, 4)
    out = _stream(llm, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                      stop_token_ids=[reference.token_ids[k]]))
    assert out.token_ids == reference.token_ids[:k + 1]
    assert out.text == llm.get_tokenizer().decode(reference.token_ids[:k],
                                                  skip_special_tokens=True)


@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_every_eos_id_of_the_model_ends_a_sequence(where: str, tiny_path: Path,
                                                   tmp_path: Path, reference: Any) -> None:
    """A model naming several EOS ids (config.json's list, or generation_config.json's, as
    LLaMA-3 / Qwen2.5 instruct models do for their end-of-turn tokens) stops at any of them,
    as HF ``generate`` does; ``ignore_eos`` and ``min_tokens`` treat all of them as EOS. An id
    other than the tokenizer's EOS is reported as the stop reason, as vLLM reports the
    generation config's other EOS ids (its stop token ids)."""
    extra = reference.token_ids[5]
    first = reference.token_ids.index(extra)
    path = tmp_path / "llama"
    shutil.copytree(tiny_path, path)
    file = path / ("config.json" if where == "config" else "generation_config.json")
    data = json.loads(file.read_text()) if file.is_file() else {}
    data["eos_token_id"] = [EOS, extra]
    file.write_text(json.dumps(data))
    llm = LLM(path, device="cpu", dtype="float32")
    out = _generate(llm, ignore_eos=False)
    assert out.token_ids == reference.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", extra)
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
    assert _generate(llm).token_ids == reference.token_ids  # ignore_eos
    late = _generate(llm, ignore_eos=False, min_tokens=first + 1)
    assert extra not in late.token_ids[:first + 1]


def test_the_tokenizers_eos_ends_a_sequence(tiny_path: Path, tmp_path: Path,
                                            reference: Any) -> None:
    """A tokenizer naming another EOS than the config (a chat fine-tune's end of turn) stops
    generation too, as vLLM stops at the tokenizer's EOS."""
    extra = reference.token_ids[5]
    first = reference.token_ids.index(extra)
    path = tmp_path / "llama"
    shutil.copytree(tiny_path, path)
    llm_plain = LLM(path, device="cpu", dtype="float32")
    token = llm_plain.get_tokenizer().convert_ids_to_tokens(extra)
    settings_file = path / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["eos_token"] = token
    settings_file.write_text(json.dumps(settings))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.get_tokenizer().eos_token_id == extra
    assert llm.engine.model_config.eos_token_id == extra  # the primary EOS: no stop reason
    assert llm.engine.model_config.eos_token_ids == {extra, EOS}
    out = _generate(llm, ignore_eos=False)
    assert out.token_ids == reference.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
