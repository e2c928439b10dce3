"""The engine's host path, made cheaper without changing what it does: the detokenizer that
remembers token strings, and the scheduler's bookkeeping (sequence budget, preemption victims)
on the runtime's tiny decoder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from engine_testutil import EOS, CharTokenizer, make_engine, run_all

from cacheflow_runtime import SamplingParams
from cacheflow_runtime.core.step_data import SchedulerOutput
from cacheflow_runtime.engine.detokenizer import Detokenizer, decode_new_text, flush_text
from cacheflow_runtime.sequence import Sequence

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
