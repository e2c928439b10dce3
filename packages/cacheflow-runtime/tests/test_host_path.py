"""The engine's host path, made cheaper without changing what it does: the detokenizer that
remembers token strings, and the scheduler's bookkeeping (sequence budget, preemption victims)
on the runtime's tiny decoder."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from engine_testutil import (
    ALPHABET,
    EOS,
    VOCAB,
    CharTokenizer,
    make_engine,
    make_high_byte_tokenizer,
    run_all,
)

from cacheflow_runtime import SamplingParams, SchedulerConfig
from cacheflow_runtime.core.block_manager import BlockSpaceManager
from cacheflow_runtime.core.scheduler import Scheduler
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.core.stop import StopRule, length_capped, token_stop
from cacheflow_runtime.engine.detokenizer import (
    Detokenizer,
    decode_new_text,
    flagged_special_ids,
    flush_text,
    token_of_id_function,
    tokens_to_string_function,
)
from cacheflow_runtime.sampling_metadata import GroupSampleResult, SampleResult
from cacheflow_runtime.sequence import Sequence, SequenceGroup, SequenceStatus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    """A byte-level BPE tokenizer with merges and three special tokens (ids 0-2), as HF
    tokenizers of LLaMA-family checkpoints are."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for symbol in sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ã", "©")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


def _random_ids(rng: random.Random, tokenizer: Any, n: int) -> list[int]:
    """Token ids of text with spaces, merges and multi-byte characters (split between tokens),
    with a special token now and then."""
    words = ["the", " the", " café", " 日本語", "x", " naïve", "!", " \U0001F600"]
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.1:
            ids.append(rng.randrange(3))
        else:
            ids.extend(tokenizer.encode(rng.choice(words), add_special_tokens=False))
    return ids[:n]


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_detokenizer_matches_decoding_each_sequence_on_its_own(hf_tokenizer: Any,
                                                               skip: bool) -> None:
    """One detokenizer shared by many sequences gives, token by token, the deltas and texts of
    the one-off functions, and (skipping special tokens) the text of decoding all at once."""
    rng = random.Random(3)
    shared = Detokenizer(hf_tokenizer)
    for _ in range(12):
        prompt = _random_ids(rng, hf_tokenizer, rng.randrange(1, 9))
        outputs = _random_ids(rng, hf_tokenizer, rng.randrange(1, 40))
        a, b = (Sequence(0, None, prompt, block_size=16) for _ in range(2))
        for token in outputs:
            for seq in (a, b):
                seq.append_token(token, {token: 0.0})
            assert shared.decode_new_text(a, skip) == decode_new_text(hf_tokenizer, b, skip)
            assert a.output_text == b.output_text
        assert shared.flush_text(a) == flush_text(hf_tokenizer, b)
        assert a.output_text == b.output_text
        if skip:
            assert a.output_text == hf_tokenizer.decode(outputs, skip_special_tokens=True)


def _byte_fallback_tokenizer() -> Any:
    """A SentencePiece-style tokenizer (Llama, Mistral, Gemma): characters outside its vocabulary
    are ``<0xNN>`` byte tokens, which its decoder joins (a run that is not valid UTF-8 becomes
    one replacement character per byte)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ("\u2581", "H", "i", "\u2581Hi"):
        vocab[piece] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                                     byte_fallback=True))
    tok.normalizer = tokenizers.normalizers.Sequence([
        tokenizers.normalizers.Prepend("\u2581"), tokenizers.normalizers.Replace(" ", "\u2581")])
    tok.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("tail, expected", [
    ([0xED], "\U0001F916\ufffd"),
    ([0xED, 0x95], "\U0001F916\ufffd\ufffd"),
    (["\u2581Hi", 0xED], "\U0001F916 Hi\ufffd"),
])
def test_a_byte_fallback_sequence_ending_inside_a_character(tail: list[Any],
                                                            expected: str) -> None:
    """A sequence that finishes inside a character (max_tokens, EOS) keeps the text it
    streamed and adds one replacement character per byte it left unfinished: decoding its held
    bytes after the robot's bytes would turn the whole run into replacement characters, which
    the flush used to slice at the wrong place."""
    tokenizer = _byte_fallback_tokenizer()
    vocab = tokenizer.get_vocab()
    robot = [vocab[f"<0x{b:02X}>"] for b in "\U0001F916".encode()]
    outputs = robot + [vocab[t] if isinstance(t, str) else vocab[f"<0x{t:02X}>"] for t in tail]
    detokenizer = Detokenizer(tokenizer)
    seq = Sequence(0, None, [1, vocab["\u2581Hi"]], block_size=16)
    streamed = []
    for token in outputs:
        seq.append_token(token, {token: 0.0})
        streamed.append(detokenizer.decode_new_text(seq, skip_special_tokens=True))
    assert "".join(streamed) == expected.rstrip("\ufffd")  # the unfinished bytes held back
    detokenizer.flush_text(seq)
    assert seq.output_text == expected


def test_detokenizer_resumes_a_sequence_with_earlier_outputs(hf_tokenizer: Any) -> None:
    """A sequence first seen with tokens already generated (recomputed after a preemption)
    continues from the text of those tokens."""
    ids = hf_tokenizer.encode(" the café 日本語 the", add_special_tokens=False)
    prompt = hf_tokenizer.encode("the", add_special_tokens=False)
    detokenizer = Detokenizer(hf_tokenizer)
    seq = Sequence(0, None, prompt, block_size=16)
    for token in ids[:7]:
        seq.append_token(token, {token: 0.0})
    for token in ids[7:]:
        seq.append_token(token, {token: 0.0})
        detokenizer.decode_new_text(seq, skip_special_tokens=True)
    detokenizer.flush_text(seq)
    assert seq.output_text == hf_tokenizer.decode(ids) == " the café 日本語 the"


class _CountingTokenizer(CharTokenizer):
    """Records the ids of every ``convert_ids_to_tokens`` call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = True,
                              ) -> list[str]:
        self.calls.append(list(ids))
        return super().convert_ids_to_tokens(ids, skip_special_tokens)


def test_detokenizer_converts_each_generated_token_id_once() -> None:
    tokenizer = _CountingTokenizer()
    detokenizer = Detokenizer(tokenizer)
    rng = random.Random(0)
    seqs = [Sequence(i, None, [1, 2, 3], block_size=16) for i in range(8)]
    generated: set[tuple[int, bool]] = set()
    for _ in range(30):
        for seq in seqs:
            token = rng.randrange(6)
            seq.append_token(token, {token: 0.0})
            skip = seq.seq_id % 2 == 0
            detokenizer.decode_new_text(seq, skip)
            generated.add((token, skip))
    # Generated tokens are converted one id at a time: once per distinct (token id, skip).
    assert sum(1 for ids in tokenizer.calls if len(ids) == 1) == len(generated)
    assert all(seq.output_text == tokenizer.decode(seq.output_token_ids, seq.seq_id % 2 == 0)
               for seq in seqs)


def _record_schedules(engine: Any) -> list[tuple[SchedulerOutput, set[str], int]]:
    """Wraps the engine's scheduler so that every step records its output, the running
    requests right after scheduling and how many sequences they hold."""
    scheduler = engine.scheduler
    plain = scheduler.schedule
    seen: list[tuple[SchedulerOutput, set[str], int]] = []

    def schedule() -> SchedulerOutput:
        out = plain()
        running = scheduler.running
        seen.append((out, {g.request_id for g in running},
                     sum(g.max_num_running_seqs() for g in running)))
        return out

    scheduler.schedule = schedule
    return seen


def _prompts(num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOS) for _ in range(rng.randrange(2, 30))] for _ in range(num)]


def test_sequence_budget_holds_with_requests_waiting(tiny: Path) -> None:
    """With more requests than ``max_num_seqs`` (some with ``best_of`` 2), a step never runs
    more sequences than the budget, and the greedy outputs are those of a roomy batch."""
    prompts = _prompts(10, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=1 + i % 2,
                             best_of=1 + i % 2, use_beam_search=i % 2 == 1)
              for i in range(len(prompts))]
    roomy = run_all(make_engine(tiny, max_num_seqs=64), prompts, params)
    engine = make_engine(tiny, max_num_seqs=5)
    steps = _record_schedules(engine)
    tight = run_all(engine, prompts, params)
    assert max(num_seqs for _, _, num_seqs in steps) <= 5
    assert [[c.token_ids for c in out.outputs] for out in tight] == \
        [[c.token_ids for c in out.outputs] for out in roomy]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_requests_are_not_scheduled_in_the_same_step(tiny: Path, mode: str) -> None:
    """A cache too small for the batch preempts running requests mid-step; none of them is in
    the step that preempted it, and the outputs are those of a large cache."""
    prompts = _prompts(8, seed=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    large = run_all(make_engine(tiny, blocks=256), prompts, params)
    engine = make_engine(tiny, blocks=24, preemption_mode=mode)
    steps = _record_schedules(engine)
    small = run_all(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for out, running, _ in steps:
        assert {req.req_id for req in out.scheduled} <= running
    assert [out.outputs[0].token_ids for out in small] == \
        [out.outputs[0].token_ids for out in large]


# ------------------------------------------------------------------ per-token stop rules
@pytest.mark.parametrize("seed", range(4))
def test_stop_rule_fires_exactly_where_token_stop_can(seed: int) -> None:
    """StopRule.may_stop is False only where token_stop returns None, and its length test is
    length_capped, over random stop ids, EOS handling, min/max tokens and lengths."""
    rng = random.Random(seed)
    for _ in range(40):
        max_tokens = rng.choice([None, rng.randrange(1, 30)])
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=rng.random() < 0.5,
            min_tokens=rng.randrange(0, (max_tokens or 30) + 1) if rng.random() < 0.5 else 0,
            stop_token_ids=rng.sample(range(12), rng.randrange(0, 3)))
        eos = rng.choice([frozenset(), frozenset({3}), frozenset({5}), frozenset({3, 7})])
        prompt_len, max_model_len = rng.randrange(1, 20), rng.randrange(21, 60)
        rule = StopRule(params, prompt_len, eos, max_model_len)
        fired = 0
        for output_len in range(1, max_model_len - prompt_len + 2):
            total_len = prompt_len + output_len
            assert rule.length_capped(output_len) == length_capped(
                params, output_len, total_len, max_model_len)
            for token_id in range(12):
                stop = token_stop(params, token_id, output_len, total_len, eos, max_model_len)
                if not rule.may_stop(token_id, output_len):
                    assert stop is None, (params, eos, token_id, output_len)
                fired += stop is not None
        assert fired > 0


# ---------------------------------------------------------------------- detokenization
def _reference_deltas(tokenizer: Any, prompt: list[int], outputs: list[int],
                      skip: bool) -> list[str]:
    """The incremental algorithm with no caching at all: the tokenizer's own
    convert_ids_to_tokens and convert_tokens_to_string for every token."""
    tokens = tokenizer.convert_ids_to_tokens(prompt, skip_special_tokens=skip)
    read = len(tokens)
    start = max(read - 5, 0)
    deltas = []
    for token_id in outputs:
        tokens.extend(tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=skip))
        prefix = tokenizer.convert_tokens_to_string(tokens[start:read])
        full = tokenizer.convert_tokens_to_string(tokens[start:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            deltas.append("")
            continue
        deltas.append(full[len(prefix):])
        start, read = read, len(tokens)
    return deltas


@pytest.fixture(scope="module")
def sp_tokenizer() -> Any:
    """A SentencePiece-style tokenizer as LLaMA checkpoints have: "▁" for spaces, one token per
    byte for what the pieces lack (byte fallback), a decoder that strips the first space."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in _SP_PIECES:
        vocab[piece] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                                     byte_fallback=True))
    decoders = tokenizers.decoders
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


_SP_PIECES = ["▁", "▁the", "▁café", "x", "!", "▁▁", "ab"]


def _sp_random_ids(rng: random.Random, tokenizer: Any, n: int) -> list[int]:
    """Pieces, multi-byte characters as byte tokens (split between steps), stray continuation
    bytes that never form a character, and special tokens."""
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.1:
            ids.append(rng.randrange(3))
        elif kind < 0.35:
            char = rng.choice(["日", "é", "\U0001F600"])
            ids.extend(tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")
                       for b in char.encode("utf-8"))
        elif kind < 0.4:
            ids.append(tokenizer.convert_tokens_to_ids("<0x80>"))
        else:
            ids.append(tokenizer.convert_tokens_to_ids(rng.choice(_SP_PIECES)))
    return ids[:n]


def _tricky_cases(name: str, tokenizer: Any, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, outputs) pairs for ``tokenizer`` (by fixture name): random ones, and outputs
    that end inside a character or start with a space."""
    rng = random.Random(seed)
    if name == "chars":
        return [([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))],
                 [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))])
                for _ in range(20)]
    draw = _sp_random_ids if name == "sp_tokenizer" else _random_ids
    cases = [(draw(rng, tokenizer, rng.randrange(1, 9)), draw(rng, tokenizer, rng.randrange(1, 40)))
             for _ in range(40)]
    emoji = list(tokenizer.encode("\U0001F600", add_special_tokens=False))
    nichi = list(tokenizer.encode("日", add_special_tokens=False))
    space = list(tokenizer.encode(" the", add_special_tokens=False))
    cases += [(space, space + emoji[:-1]), (emoji[:2], emoji[2:] + space), (space, [2] + space),
              (space, nichi[1:2] + space + nichi + emoji[1:] + space)]
    return cases


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
@pytest.mark.parametrize("name", ["hf_tokenizer", "sp_tokenizer", "chars"])
def test_decoding_a_finished_output_at_once_gives_the_streamed_text(
        request: pytest.FixtureRequest, name: str, skip: bool) -> None:
    """decode_output (a sequence decoded only once it finished) gives the text of
    decode_new_text token by token and flush_text, for byte-level and SentencePiece-style
    tokenizers (characters split over tokens, bytes that never form one, special tokens,
    leading spaces) and a character tokenizer; a sequence left undecoded for a while and then
    decoded as a stream catches up with the stream's text."""
    tokenizer = CharTokenizer() if name == "chars" else request.getfixturevalue(name)
    detokenizer = Detokenizer(tokenizer)
    split = invalid = 0
    for prompt, outputs in _tricky_cases(name, tokenizer, seed=11):
        streamed, at_once, resumed = (Sequence(0, None, prompt, block_size=16) for _ in range(3))
        for i, token in enumerate(outputs):
            for seq in (streamed, at_once, resumed):
                seq.append_token(token, {token: 0.0})
            detokenizer.decode_new_text(streamed, skip)
            if i >= len(outputs) // 2:
                detokenizer.decode_new_text(resumed, skip)
                assert resumed.output_text == streamed.output_text
        split += streamed.read_offset < len(streamed.tokens or [])
        detokenizer.flush_text(streamed)
        detokenizer.flush_text(resumed)
        detokenizer.decode_output(at_once, skip)
        assert at_once.output_text == streamed.output_text == resumed.output_text
        assert at_once.num_detokenized == streamed.num_detokenized == len(outputs)
        invalid += "\ufffd" in streamed.output_text
    if name != "chars":
        assert split > 0 and invalid > 0  # outputs that end inside a character or hold bytes
        # that never form one


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_detokenizer_deltas_match_the_uncached_algorithm(hf_tokenizer: Any, skip: bool) -> None:
    """With the token-text cache and the tokenizer's decoder called directly, every delta is
    the one the plain algorithm gives (multi-byte characters held back included)."""
    rng = random.Random(5)
    detokenizer = Detokenizer(hf_tokenizer)
    held = 0
    for _ in range(20):
        prompt = _random_ids(rng, hf_tokenizer, rng.randrange(1, 9))
        outputs = _random_ids(rng, hf_tokenizer, rng.randrange(1, 40))
        seq = Sequence(0, None, prompt, block_size=16)
        deltas = []
        for token in outputs:
            seq.append_token(token, {token: 0.0})
            deltas.append(detokenizer.decode_new_text(seq, skip))
        expected = _reference_deltas(hf_tokenizer, prompt, outputs, skip)
        assert deltas == expected
        held += expected.count("")
    assert held > 0  # some steps held back a partial character


def test_tokenizer_shortcuts_apply_only_to_hf_own_methods(hf_tokenizer: Any) -> None:
    """The HF fast tokenizer's own convert_tokens_to_string and convert_ids_to_tokens are
    replaced by what they call (same results, for every id of the vocabulary); a subclass that
    overrides them, and any other tokenizer, keep theirs."""
    tokens = hf_tokenizer.convert_ids_to_tokens(
        hf_tokenizer.encode(" the café 日本語", add_special_tokens=False))
    fast = tokens_to_string_function(hf_tokenizer)
    assert fast.__self__ is not hf_tokenizer
    assert fast(tokens) == hf_tokenizer.convert_tokens_to_string(tokens) == " the café 日本語"
    convert = token_of_id_function(hf_tokenizer)
    for skip in (True, False):
        assert [convert(i, skip) for i in range(len(hf_tokenizer))] == [
            tuple(hf_tokenizer.convert_ids_to_tokens([i], skip_special_tokens=skip))
            for i in range(len(hf_tokenizer))]
    assert convert(2, True) == () and convert(2, False) == ("</s>",)

    class Shouting(type(hf_tokenizer)):  # type: ignore[misc]
        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return super().convert_tokens_to_string(tokens).upper()

        def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
            return [t.upper() for t in super().convert_ids_to_tokens(ids, skip_special_tokens)]

    shouting = object.__new__(Shouting)
    shouting.__dict__.update(hf_tokenizer.__dict__)
    assert tokens_to_string_function(shouting)(tokens) == " THE CAFÉ 日本語"
    assert token_of_id_function(shouting)(hf_tokenizer.convert_tokens_to_ids("Ġthe"), True) \
        == ("ĠTHE",)
    chars = CharTokenizer()
    assert tokens_to_string_function(chars) == chars.convert_tokens_to_string
    assert token_of_id_function(chars)(EOS, False) == ("</s>",)
    assert token_of_id_function(chars)(EOS, True) == ("",)


# Ids of the added special tokens of the tokenizer below that ``all_special_ids`` lacks.
_FILE_SEP, _GH_STARS = EOS - 2, EOS - 1


@pytest.fixture(scope="module")
def added_special_tokenizer() -> Any:
    """A tokenizer of the tiny decoder's vocabulary (one token per character, then
    ``<file_sep>``, ``<gh_stars>`` and ``</s>``) whose added tokens are all flagged special but
    only ``</s>`` is in ``all_special_ids``, as in SmolLM2's and Llama-3's tokenizers."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(ALPHABET[:_FILE_SEP])}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(["<file_sep>", "<gh_stars>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    assert tokenizer.convert_tokens_to_ids(["<file_sep>", "<gh_stars>", "</s>"]) == \
        [_FILE_SEP, _GH_STARS, EOS]
    assert tokenizer.all_special_ids == [EOS]
    return tokenizer


class _OwnConversion(CharTokenizer):
    """A tokenizer with its own ``convert_ids_to_tokens`` (not the HF fast one) that skips
    only EOS, and an added token flagged special (id 0)."""

    added_tokens_decoder = {0: SimpleNamespace(content="a", special=True),
                            1: SimpleNamespace(content="b", special=False)}


def test_flagged_special_ids_are_the_added_tokens_flagged_special(
        added_special_tokenizer: Any) -> None:
    assert flagged_special_ids(added_special_tokenizer) == {_FILE_SEP, _GH_STARS, EOS}
    assert flagged_special_ids(_OwnConversion()) == {0}
    assert flagged_special_ids(CharTokenizer()) == frozenset()


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_detokenizer_skips_every_added_token_flagged_special(added_special_tokenizer: Any,
                                                             skip: bool) -> None:
    """Added tokens flagged special but missing from ``all_special_ids`` are dropped when
    skipping special tokens, in prompts and outputs, streamed or decoded at once: the text is
    ``tokenizer.decode(outputs, skip_special_tokens=skip)``."""
    tokenizer = added_special_tokenizer
    detokenizer = Detokenizer(tokenizer)
    rng = random.Random(7)
    for _ in range(20):
        prompt, outputs = ([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
                           for _ in range(2))
        outputs += [_FILE_SEP, 3, _GH_STARS]
        streamed, at_once = (Sequence(0, None, prompt, block_size=16) for _ in range(2))
        for token in outputs:
            for seq in (streamed, at_once):
                seq.append_token(token, {token: 0.0})
            detokenizer.decode_new_text(streamed, skip)
        detokenizer.flush_text(streamed)
        detokenizer.decode_output(at_once, skip)
        expected = tokenizer.decode(outputs, skip_special_tokens=skip)
        assert streamed.output_text == at_once.output_text == expected
        assert ("<file_sep>" in expected) is not skip


def test_own_conversions_also_skip_added_tokens_flagged_special() -> None:
    """A tokenizer whose ``convert_ids_to_tokens`` the detokenizer calls (prompt and outputs)
    still loses its added tokens flagged special when skipping, and keeps the others."""
    tokenizer = _OwnConversion()
    detokenizer = Detokenizer(tokenizer)
    convert = token_of_id_function(tokenizer)
    assert (convert(0, True), convert(0, False), convert(1, True)) == ((), ("a",), ("b",))
    for skip, prompt_tokens, expected in ((True, ["b"], "bcb"),
                                          (False, ["a", "b", "a"], "abcab</s>")):
        seq = Sequence(0, None, [0, 1, 0], block_size=16)
        for token in (0, 1, 2, 0, 1, EOS):
            seq.append_token(token, {token: 0.0})
            detokenizer.decode_new_text(seq, skip)
        detokenizer.flush_text(seq)
        assert seq.tokens is not None and seq.tokens[:len(prompt_tokens)] == prompt_tokens
        assert seq.output_text == expected


@pytest.mark.parametrize("final_only", [False, True], ids=["streamed", "final_only"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_engine_output_text_skips_added_tokens_flagged_special(
        tiny: Path, added_special_tokenizer: Any, skip: bool, final_only: bool) -> None:
    """The engine's output text (streamed step by step, or built once the request finished) is
    the tokenizer's own decoding of the generated tokens, added special tokens included."""
    tokenizer = added_special_tokenizer
    engine = make_engine(tiny, tokenizer=tokenizer)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True,
                            logit_bias={_FILE_SEP: 4.0, _GH_STARS: 4.0},
                            skip_special_tokens=skip)
    engine.add_request("r", None, params, [3, 4, _FILE_SEP, 5])
    streamed = ""
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=final_only):
            streamed = out.outputs[0].text
            ids = out.outputs[0].token_ids
    assert {_FILE_SEP, _GH_STARS} & set(ids) and set(ids) - {_FILE_SEP, _GH_STARS, EOS}
    assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<" in streamed) is not skip


# ------------------------------------------------------------------- the step's plain data
def test_scheduled_sequences_carry_each_field() -> None:
    """What the scheduler sends for a sequence outside the columnar decodes (a penalty needs
    the worker to keep its outputs), field by field: the prompt with its whole block table at
    first, then one token with the appended blocks and the outputs since."""
    bm = BlockSpaceManager(8, num_gpu_blocks=16, num_cpu_blocks=0)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=64,
                                          async_scheduling=False), bm, eos_token_ids={EOS})
    seq = Sequence(scheduler.new_seq_id(), None, list(range(1, 9)), block_size=8)
    scheduler.add_seq_group(SequenceGroup("a", [seq], SamplingParams(max_tokens=5,
                                                                     presence_penalty=0.5)))

    out = scheduler.schedule()
    assert [n.req_id for n in out.new_requests] == ["a"]
    (req,) = out.scheduled
    assert (req.req_id, req.do_sample, req.is_first_sample) == ("a", True, True)
    (s,) = req.seqs
    assert (s.seq_id, s.token_ids, s.num_computed_tokens) == (seq.seq_id, list(range(1, 9)), 0)
    assert (s.block_ids, s.new_block_ids) == ([0], [])
    assert (s.output_token_ids, s.new_output_token_ids) == ([], [])
    assert (s.sample_index, s.cumulative_logprob) == (0, 0.0)

    def sample(token: int) -> ModelRunnerOutput:
        result = GroupSampleResult([SampleResult(seq.seq_id, token, {token: -0.25}, 0.0)])
        return ModelRunnerOutput(samples={"a": result})

    (touched,) = scheduler.update_from_output(out, sample(11))
    assert touched.request_id == "a" and seq.output_token_ids == [11]
    out = scheduler.schedule()
    (req,) = out.scheduled
    assert (req.do_sample, req.is_first_sample, out.new_requests) == (True, False, [])
    (s,) = req.seqs
    assert (s.token_ids, s.num_computed_tokens) == ([11], 8)
    assert (s.block_ids, s.new_block_ids) == (None, [1])  # token 9 starts block 1
    assert (s.output_token_ids, s.new_output_token_ids) == (None, [11])
    assert s.cumulative_logprob == -0.25

    scheduler.update_from_output(out, sample(12))
    (s,) = scheduler.schedule().scheduled[0].seqs
    assert (s.token_ids, s.num_computed_tokens, s.block_ids, s.new_block_ids) == \
        ([12], 9, None, [])
    assert (s.new_output_token_ids, s.cumulative_logprob) == ([12], -0.5)


# ------------------------------------------------------------------------ final-only steps
def test_final_only_steps_return_the_finished_outputs_of_plain_steps(tiny: Path) -> None:
    """step(final_only=True) returns exactly the finished outputs step() returns (tokens,
    text, logprobs, finish reasons), each once and nothing else, for greedy, parallel, beam
    search and an abort."""
    prompts = _prompts(6, seed=4)
    kinds = [dict(temperature=0.0), dict(n=2, best_of=3, temperature=0.8, seed=3),
             dict(n=2, best_of=2, use_beam_search=True, temperature=0.0)]
    params = [SamplingParams(max_tokens=4 + i, logprobs=1, **kinds[i % 3])
              for i in range(len(prompts))]

    def run(final_only: bool) -> tuple[list[Any], int]:
        engine = make_engine(tiny)
        for i, (ids, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", None, p, ids)
        unfinished = 0
        finished = []
        for step in itertools.count():
            if not engine.has_unfinished_requests():
                break
            if step == 2:
                engine.abort_request("r4")
            for out in engine.step(final_only=final_only):
                if not out.finished:
                    unfinished += 1
                    continue
                finished.append((out.request_id, [(c.token_ids, c.text, c.logprobs,
                                                   c.finish_reason) for c in out.outputs]))
        return finished, unfinished

    plain, plain_unfinished = run(final_only=False)
    final, final_unfinished = run(final_only=True)
    assert plain_unfinished > 0 and final_unfinished == 0
    # A final-only text may complete a step later, so the order may differ; each request's
    # final output comes once.
    assert sorted(final) == sorted(plain)
    assert sorted(rid for rid, _ in final) == sorted(f"r{i}" for i in range(len(prompts)))
    assert dict(final)["r4"][0][3] == "abort"


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_abort_of_a_finished_request_waiting_for_its_text_keeps_its_output(
        tiny: Path, async_scheduling: bool) -> None:
    """Under step(final_only=True) a request that finished but still waits for its text is not
    changed by an abort: its final output comes once, with its tokens and finish reason."""
    params = [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    prompts = [[5, 6, 7], [8, 9, 10]]
    expected = [(list(out.outputs[0].token_ids), out.outputs[0].finish_reason)
                for out in run_all(make_engine(tiny, async_scheduling=async_scheduling), prompts,
                                   params)]
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    ids = ["short", "long"]
    for rid, ids_, p in zip(ids, prompts, params):
        engine.add_request(rid, None, p, ids_)
    reported: list[tuple[str, list[int], Optional[str]]] = []
    steps = 0
    while not engine.output_processor.has_finished_backlog:
        assert steps < 10, "the short request never waited for its text"
        reported += [(o.request_id, list(o.outputs[0].token_ids), o.outputs[0].finish_reason)
                     for o in engine.step(final_only=True)]
        steps += 1
    assert not reported
    engine.abort_request("short")
    while engine.has_unfinished_requests():
        reported += [(o.request_id, list(o.outputs[0].token_ids), o.outputs[0].finish_reason)
                     for o in engine.step(final_only=True)]
    by_id = {rid: (tokens, reason) for rid, tokens, reason in reported}
    assert len(reported) == 2
    assert [by_id["short"], by_id["long"]] == expected
    assert expected[0][1] == "length" and len(expected[0][0]) == 2


class _CountingDecoder(CharTokenizer):
    """Counts its ``convert_tokens_to_string`` calls (one per decoding of the detokenizer)."""

    def __init__(self) -> None:
        self.calls = 0

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        self.calls += 1
        return super().convert_tokens_to_string(tokens)


def _texts(tiny: Path, prompts: list[list[int]], params: list[SamplingParams],
           final_only: bool) -> tuple[dict[str, tuple[str, list[int], Any]], int]:
    """The finished (text, token ids, finish reason) per request, and the decoder calls."""
    tokenizer = _CountingDecoder()
    engine = make_engine(tiny, tokenizer=tokenizer)
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", None, p, ids)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=final_only):
            if out.finished:
                done[out.request_id] = (out.outputs[0].text, out.outputs[0].token_ids,
                                        out.outputs[0].finish_reason)
    return done, tokenizer.calls


def test_final_only_steps_decode_each_output_once_unless_it_has_stop_strings(
        tiny: Path) -> None:
    """Under step(final_only=True) a request without stop strings is decoded once, when it
    finishes, to the text step() streams; one with a stop string is still decoded token by token
    and stops where step() stops it, with the same text."""
    prompts = _prompts(5, seed=6)
    params = [SamplingParams(temperature=0.0, max_tokens=10 + i, ignore_eos=i % 2 == 0,
                             skip_special_tokens=i % 3 != 0) for i in range(len(prompts))]
    streamed, streamed_calls = _texts(tiny, prompts, params, final_only=False)
    final, final_calls = _texts(tiny, prompts, params, final_only=True)
    assert final == streamed
    num_tokens = sum(len(ids) for _, ids, _ in streamed.values())
    assert streamed_calls >= num_tokens > 5 * 2
    assert final_calls <= 2 * len(prompts)  # the prompt's context, then everything after it

    text = streamed["r0"][0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params[0] = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop])
    streamed, _ = _texts(tiny, prompts, params, final_only=False)
    final, _ = _texts(tiny, prompts, params, final_only=True)
    assert final == streamed
    assert final["r0"][2] == "stop" and final["r0"][0] == text[:text.index(stop)]


@pytest.fixture(scope="module")
def high_byte_tokenizer() -> Any:
    """See engine_testutil.make_high_byte_tokenizer."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return make_high_byte_tokenizer()


class _Device:
    """A pretend device for the engine's step handles: ``ready()`` is False for the first
    ``busy_polls`` asks of each step (the device still computing), and the tokenizer below
    records whether each of its decodings ran in such a window."""

    def __init__(self, engine: Any, busy_polls: int) -> None:
        self.inner = engine.executor
        self.busy_polls = busy_polls
        self.busy = False
        engine.executor = self

    def execute_model_async(self, plan: SchedulerOutput) -> Any:
        return _BusyStep(self, self.inner.execute_model_async(plan))

    def shutdown(self) -> None:
        self.inner.shutdown()


class _BusyStep:
    def __init__(self, device: _Device, inner: Any) -> None:
        self.device, self.inner, self.polls = device, inner, 0

    def ready(self) -> bool:
        self.polls += 1
        self.device.busy = self.polls <= self.device.busy_polls
        return not self.device.busy

    def result(self) -> ModelRunnerOutput:
        self.device.busy = False
        return self.inner.result()


@pytest.mark.parametrize("busy_polls", [0, 2, 10_000], ids=["host_bound", "short", "device_bound"])
def test_final_only_texts_are_built_while_the_device_computes(
        tiny: Path, high_byte_tokenizer: Any, busy_polls: int) -> None:
    """Under step(final_only=True) the texts of requests without stop strings are built while
    the step's handle says the device is still busy: with a device slower than the host, no
    decoding happens outside those windows except what is left when the last step ends; texts
    (invalid UTF-8 and split characters included), token ids and finish reasons are those of
    step(), a request's final output comes at most one step after step() gives it, and each
    comes once, also when the host never waits (no windows) or the windows are short."""
    rng = random.Random(8)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 20))] for _ in range(12)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=3 + 5 * i,
                             ignore_eos=True, skip_special_tokens=i % 3 != 0)
              for i in range(len(prompts))]

    def run(final_only: bool) -> tuple[dict[str, tuple[Any, ...]], dict[str, int], Any]:
        calls = {True: 0, False: 0}  # device busy -> decodings
        device: Optional[_Device] = None
        decode = high_byte_tokenizer.backend_tokenizer.decoder.decode

        class Counting(type(high_byte_tokenizer)):  # type: ignore[misc]
            def convert_tokens_to_string(self, tokens: list[str]) -> str:
                calls[device is not None and device.busy] += 1
                return decode(tokens)

        tokenizer = object.__new__(Counting)
        tokenizer.__dict__.update(high_byte_tokenizer.__dict__)
        engine = make_engine(tiny, tokenizer=tokenizer)
        device = _Device(engine, busy_polls)
        for i, (ids, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", None, p, ids)
        done: dict[str, tuple[Any, ...]] = {}
        when: dict[str, int] = {}
        for step in itertools.count():
            if not engine.has_unfinished_requests():
                break
            for out in engine.step(final_only=final_only):
                if out.finished:
                    assert out.request_id not in done
                    (c,) = out.outputs
                    done[out.request_id] = (c.text, c.token_ids, c.finish_reason)
                    when[out.request_id] = step
        return done, when, calls

    plain, plain_when, _ = run(final_only=False)
    final, final_when, calls = run(final_only=True)
    assert final == plain and len(final) == len(prompts)
    assert sum("\ufffd" in text for text, _, _ in final.values()) >= 3
    assert all(final_when[r] <= plain_when[r] + 1 for r in plain)
    if busy_polls == 10_000:
        last = max(plain_when.values())
        left = sum(len(plain[r][1]) for r in plain if plain_when[r] >= last - 1)
        assert calls[True] > 2 * calls[False]
        assert calls[False] <= 4 * len(prompts) + left


def test_a_sample_replaces_the_placeholder_or_follows_the_outputs() -> None:
    """Sequence.add_sample: a sampled token takes the trailing placeholder's place (a step
    scheduled ahead), or is appended when there is none; logprobs and lengths follow."""
    seq = Sequence(0, None, [5, 6], block_size=8)
    assert seq.add_sample(7, -0.5, {7: -0.5}) == 1
    seq.append_placeholder()
    assert seq.has_placeholder and seq.output_token_ids == [7, -1]
    assert seq.add_sample(9, -0.25, {9: -0.25, 3: -2.0}) == 2
    assert not seq.has_placeholder
    assert (seq.output_token_ids, seq.output_logprobs) == ([7, 9], [{7: -0.5},
                                                                  {9: -0.25, 3: -2.0}])
    assert seq.cumulative_logprob == -0.75 and seq.get_len() == 4


def test_finish_reasons_of_statuses() -> None:
    assert [s.finish_reason for s in SequenceStatus] == \
        [None, None, None, "stop", "length", "abort"]
