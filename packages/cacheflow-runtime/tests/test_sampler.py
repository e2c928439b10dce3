"""Tests of the sampler: penalties, greedy, random sampling, seeding, beam search, logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cacheflow_runtime.config import LOGPROBS_MODES
from cacheflow_runtime.sampler import Sampler
from cacheflow_runtime.sampling_metadata import DecodeRows, GroupSampleResult, SamplingGroup
from cacheflow_runtime.sampling_params import SamplingParams
from cacheflow_runtime.seeded_noise import hashed_exponential, seed_key

NEG_INF = float("-inf")
# Upper 0.1% points of the chi-square distribution by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
            9: 27.88, 10: 29.59}
NUM_DRAWS = 20_000


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def decode_group(params: SamplingParams, rows: list[int], *, prompt: list[int] | None = None,
                 outputs: list[list[int]] | None = None,
                 cumulative: list[float] | None = None,
                 seed_keys: list[int | None] | None = None,
                 eos: int | None = None, first_seq_id: int = 100) -> SamplingGroup:
    """A decode-step group with one sequence per row."""
    n = len(rows)
    return SamplingGroup(
        seq_ids=list(range(first_seq_id, first_seq_id + n)),
        sampling_params=params,
        is_prompt=False,
        logit_rows=rows,
        prompt_token_ids=prompt if prompt is not None else [0],
        output_token_ids=outputs if outputs is not None else [[] for _ in rows],
        cumulative_logprobs=cumulative if cumulative is not None else [0.0] * n,
        seed_keys=seed_keys if seed_keys is not None else [None] * n,
        eos_token_ids=frozenset() if eos is None else frozenset({eos}),
    )


def prompt_group(params: SamplingParams, row: int, prompt: list[int], *,
                 seed_keys: list[int | None] | None = None,
                 prompt_rows: list[int] | None = None, seq_id: int = 7,
                 eos: int | None = None) -> SamplingGroup:
    """A prompt-step group: one row for the last prompt position."""
    return SamplingGroup(
        seq_ids=[seq_id],
        sampling_params=params,
        is_prompt=True,
        logit_rows=[row],
        prompt_token_ids=prompt,
        output_token_ids=[[]],
        cumulative_logprobs=[0.0],
        seed_keys=seed_keys if seed_keys is not None else [None] * (params.best_of or 1),
        prompt_logit_rows=prompt_rows or [],
        eos_token_ids=frozenset() if eos is None else frozenset({eos}),
    )


def full_logprobs(result: GroupSampleResult, vocab: int) -> torch.Tensor:
    """The logprob vector reported for the first sample (needs logprobs >= vocab)."""
    lp = result.samples[0].logprobs
    assert sorted(lp) == list(range(vocab))
    return torch.tensor([lp[t] for t in range(vocab)])


def draw_counts(logits_row: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
    """Token frequencies of NUM_DRAWS draws from one prompt row (best_of = NUM_DRAWS), all drawn
    by one seeded default generator."""
    group = prompt_group(dataclasses.replace(params, best_of=NUM_DRAWS), 0, [1, 2])
    out = Sampler()(logits_row.unsqueeze(0), [group], default_generator=seeded(seed))[0]
    tokens = torch.tensor([s.token_id for s in out.samples])
    assert len(out.samples) == NUM_DRAWS
    assert all(s.parent_seq_id == 7 for s in out.samples)
    return torch.bincount(tokens, minlength=logits_row.numel()).to(torch.float64)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens with positive expected probability, and its dof."""
    support = probs > 0
    expected = probs[support].to(torch.float64) * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum().item()) - 1


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Counts outside the support of probs are zero and the rest fit probs (chi-square 0.1%)."""
    assert counts[probs == 0].sum().item() == 0
    stat, dof = chi_square(counts, probs)
    assert stat < CHI2_999[dof], (stat, dof, counts / counts.sum(), probs)
    assert (counts / counts.sum() - probs.to(torch.float64)).abs().max().item() < 0.02


# --------------------------------------------------------------------------- penalties

BASE = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
PROCESSED = Sampler(logprobs_mode="processed_logprobs")
PROMPT = [0, 1]
OUTPUT = [3, 3, 4]


def penalized(params: SamplingParams, prompt: list[int] = PROMPT, outputs: list[int] = OUTPUT,
              eos: int | None = None) -> torch.Tensor:
    """The log_softmax vector greedy sampling of BASE with these params reports as processed
    logprobs (what the penalties, bias and masks made of the logits)."""
    params = dataclasses.replace(params, logprobs=BASE.numel())
    group = decode_group(params, [0], prompt=prompt, outputs=[outputs], eos=eos)
    return full_logprobs(PROCESSED(BASE.unsqueeze(0), [group])[0], BASE.numel())


def expected_logprobs(logits: list[float]) -> torch.Tensor:
    """log_softmax of hand-computed logits."""
    return torch.log_softmax(torch.tensor(logits), dim=-1)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    got = penalized(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    # seen: prompt {0, 1}, output {3, 4}; 2 and 5 untouched.
    want = expected_logprobs([1.0, -2.0, 0.5, 1.5, -4.0, 0.0])
    torch.testing.assert_close(got, want)


def test_repetition_penalty_above_two_is_taken() -> None:
    """Any finite penalty above 0 (vLLM's bound): 5 divides and multiplies by 5."""
    got = penalized(SamplingParams(temperature=0.0, repetition_penalty=5.0))
    torch.testing.assert_close(got, expected_logprobs([0.4, -5.0, 0.5, 0.6, -10.0, 0.0]))
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
        SamplingParams(repetition_penalty=math.inf)


def test_repetition_penalty_matches_hf_processor() -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.3)
    gen = seeded(3)
    logits = torch.randn(1, 30, generator=gen)
    prompt, output = [1, 5, 5, 9], [2, 9, 17]
    want = processor(torch.tensor([prompt + output]), logits.clone())[0]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=20)
    group = decode_group(params, [0], prompt=prompt, outputs=[output])
    lp = PROCESSED(logits, [group])[0].samples[0].logprobs
    want_lp = torch.log_softmax(want, dim=-1)
    for token, value in lp.items():
        assert value == pytest.approx(want_lp[token].item(), abs=1e-6)


def test_frequency_penalty_uses_output_counts_only() -> None:
    got = penalized(SamplingParams(temperature=0.0, frequency_penalty=0.5))
    # output counts: 3 -> 2, 4 -> 1; prompt tokens are not counted.
    want = expected_logprobs([2.0, -1.0, 0.5, 2.0, -2.5, 0.0])
    torch.testing.assert_close(got, want)


def test_presence_penalty_subtracts_once_per_output_token() -> None:
    got = penalized(SamplingParams(temperature=0.0, presence_penalty=-1.5))
    want = expected_logprobs([2.0, -1.0, 0.5, 4.5, -0.5, 0.0])
    torch.testing.assert_close(got, want)


def test_penalties_apply_repetition_first_then_frequency_and_presence() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25)
    got = penalized(params)
    want = expected_logprobs([1.0, -2.0, 0.5, 1.5 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 0.0])
    torch.testing.assert_close(got, want)


def test_penalties_change_the_greedy_choice_and_are_per_sequence() -> None:
    logits = torch.stack([BASE, BASE])
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    group = decode_group(params, [0, 1], prompt=PROMPT, outputs=[[3], []])
    out = Sampler()(logits, [group])[0]
    assert [s.token_id for s in out.samples] == [0, 3]  # 3 - 2 = 1 < 2 for the first row only


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(ignore_eos: bool) -> None:
    params = SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[0],
                            ignore_eos=ignore_eos)
    got = penalized(params, outputs=[1, 2, 3], eos=3)
    assert got[0].item() == NEG_INF and got[3].item() == NEG_INF
    want = expected_logprobs([NEG_INF, -1.0, 0.5, NEG_INF, -2.0, 0.0])
    torch.testing.assert_close(got, want)
    group = decode_group(SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[0]), [0],
                         outputs=[[1, 2, 3]], eos=3)
    assert Sampler()(BASE.unsqueeze(0), [group])[0].samples[0].token_id == 2


def test_min_tokens_stops_masking_once_reached() -> None:
    got = penalized(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[0]),
                    outputs=[1, 2, 3], eos=3)
    torch.testing.assert_close(got, torch.log_softmax(BASE, dim=-1))


def test_logit_bias_is_added_before_the_penalties() -> None:
    params = SamplingParams(temperature=0.0, logit_bias={3: -100, 1: 4.0, 5: 0.5},
                            repetition_penalty=2.0)
    got = penalized(params)
    # BASE + bias = [2, 3, 0.5, -97, -2, 0.5], then / or * 2 on the seen ids {0, 1, 3, 4}.
    want = expected_logprobs([1.0, 1.5, 0.5, -194.0, -4.0, 0.5])
    torch.testing.assert_close(got, want)


def test_logit_bias_applies_to_its_own_rows_only() -> None:
    logits = torch.stack([BASE, BASE, BASE])
    banned = decode_group(SamplingParams(temperature=0.0, logit_bias={3: -100}), [0, 2])
    plain = decode_group(SamplingParams(temperature=0.0), [1], first_seq_id=200)
    forced = decode_group(SamplingParams(temperature=1.0, logit_bias={4: 100}), [1],
                          first_seq_id=300)
    out = Sampler()(logits, [banned, plain, forced], default_generator=seeded(0))
    assert [s.token_id for s in out[0].samples] == [0, 0]
    assert [s.token_id for s in out[1].samples] == [3]
    assert [s.token_id for s in out[2].samples] == [4]


def test_allowed_token_ids_mask_the_rest_before_the_bias() -> None:
    params = SamplingParams(temperature=0.0, allowed_token_ids=[1, 2, 5], logit_bias={2: 1.0})
    got = penalized(params)
    inf = float("-inf")
    want = expected_logprobs([inf, -1.0, 1.5, inf, inf, 0.0])
    torch.testing.assert_close(got, want)
    logits = torch.randn(32, 40, generator=seeded(4))
    allowed = [3, 9, 31]
    group = decode_group(SamplingParams(temperature=2.0, allowed_token_ids=allowed),
                         list(range(32)))
    other = decode_group(SamplingParams(temperature=0.0), [0], first_seq_id=500)
    out = Sampler()(logits, [group, other], default_generator=seeded(5))
    picks = [s.token_id for s in out[0].samples]
    assert set(picks) <= set(allowed) and len(set(picks)) > 1
    assert out[1].samples[0].token_id == int(logits[0].argmax())


def test_bad_words_mask_a_words_last_token_after_its_other_tokens() -> None:
    params = SamplingParams(temperature=0.0, bad_words=["x"])
    params.bad_words_token_ids = [[3], [4, 0], [1, 4, 2]]  # as the engine sets them
    logits = torch.stack([BASE, BASE, BASE, BASE])
    # Row 0: no 4 before: 0 (2.0) stays, 3 is banned always -> 0. Row 1: ends with 4 -> 0 banned
    # too -> 2 (0.5). Row 2: ends with 1, 4 -> 2 banned as well -> 5 (0.0). Row 3: 4 then 3.
    group = decode_group(params, [0, 1, 2, 3], outputs=[[], [2, 4], [1, 4], [4, 3]])
    got = [s.token_id for s in Sampler()(logits, [group])[0].samples]
    assert got == [0, 2, 5, 0]


def test_logit_bias_forces_a_random_row_every_time() -> None:
    rows = 64
    logits = torch.randn(rows, 50, generator=seeded(1))
    group = decode_group(SamplingParams(temperature=1.5, top_p=0.9, logit_bias={17: 100}),
                         list(range(rows)))
    out = Sampler()(logits, [group], default_generator=seeded(2))[0]
    assert [s.token_id for s in out.samples] == [17] * rows


# --------------------------------------------------------------------------- greedy, logprobs

def test_greedy_picks_argmax_with_lowest_id_on_ties() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 3.0], [5.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    group = decode_group(SamplingParams(temperature=0.0), [2, 0, 1])
    out = Sampler()(logits, [group])[0]
    assert [s.token_id for s in out.samples] == [3, 1, 0]
    assert [s.parent_seq_id for s in out.samples] == [100, 101, 102]


def test_logprobs_hold_chosen_plus_top_k_with_log_softmax_values() -> None:
    gen = seeded(0)
    logits = torch.randn(2, 50, generator=gen)
    logits[1, 7] = 100.0  # greedy picks 7 for row 1
    lsm = torch.log_softmax(logits, dim=-1)
    group = decode_group(SamplingParams(temperature=0.0, logprobs=3), [0, 1],
                         cumulative=[-1.5, -2.0])
    out = Sampler()(logits, [group])[0]
    for i, sample in enumerate(out.samples):
        top = set(torch.topk(lsm[i], 3).indices.tolist())
        assert sample.token_id == int(lsm[i].argmax())
        assert set(sample.logprobs) == top | {sample.token_id}
        for token, value in sample.logprobs.items():
            assert value == pytest.approx(lsm[i, token].item(), abs=1e-6)
        want_cum = [-1.5, -2.0][i] + lsm[i, sample.token_id].item()
        assert sample.cumulative_logprob == pytest.approx(want_cum, abs=1e-6)


def test_logprobs_none_reports_only_the_chosen_token_and_zero_likewise() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    for k in (None, 0):
        out = Sampler()(logits, [decode_group(SamplingParams(temperature=0.0, logprobs=k), [0])])
        assert list(out[0].samples[0].logprobs) == [1]


def test_logprobs_are_raw_by_default_as_vllm() -> None:
    """The default ``raw_logprobs``: log_softmax of the model's logits, before temperature,
    truncation, penalties and bias, for the chosen token, the top ones and the cumulative sum."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 1.5]])
    params = SamplingParams(temperature=0.5, top_k=2, logprobs=4, presence_penalty=1.0,
                            logit_bias={4: 2.0})
    group = decode_group(params, [0], outputs=[[1]], seed_keys=[1])
    sample = Sampler()(logits, [group], positions=torch.tensor([3]))[0].samples[0]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert sample.token_id in (1, 4)
    assert set(sample.logprobs) == {1, 4, 0, 2}
    for token, value in sample.logprobs.items():
        assert value == pytest.approx(raw[token].item(), abs=1e-6)
    assert sample.cumulative_logprob == pytest.approx(raw[sample.token_id].item(), abs=1e-6)
    # Truncation alone (temperature 1, nothing else) leaves the raw values too.
    group = decode_group(SamplingParams(temperature=1.0, top_k=2, logprobs=4), [0],
                         seed_keys=[2])
    sample = Sampler()(logits, [group], positions=torch.tensor([3]))[0].samples[0]
    assert sample.logprobs == pytest.approx({t: raw[t].item() for t in (1, 4, 0, 2)}, abs=1e-6)
    with pytest.raises(ValueError, match="logprobs_mode must be one of raw_logprobs"):
        Sampler(logprobs_mode="raw")


def test_processed_logprobs_follow_temperature_and_truncation() -> None:
    """``processed_logprobs``: after the temperature and top-k, so only the kept tokens are
    finite and they sum to one; ``processed_logits``: the scaled logits of the kept tokens."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 1.5]])
    params = SamplingParams(temperature=0.5, top_k=2, logprobs=4)
    kept = torch.tensor([NEG_INF, 4.0, NEG_INF, NEG_INF, 3.0])
    for mode, want in (("processed_logprobs", torch.log_softmax(kept, dim=-1)),
                       ("processed_logits", kept)):
        group = decode_group(params, [0], seed_keys=[1])
        sample = Sampler(logprobs_mode=mode)(logits, [group],
                                             positions=torch.tensor([3]))[0].samples[0]
        assert sample.token_id in (1, 4)
        for token, value in sample.logprobs.items():
            assert value == want[token].item() or value == pytest.approx(want[token].item())
        assert sample.logprobs[sample.token_id] > NEG_INF
    group = decode_group(SamplingParams(temperature=0.0, logprobs=2), [0])
    sample = Sampler(logprobs_mode="raw_logits")(logits, [group])[0].samples[0]
    assert sample.token_id == 1 and sample.logprobs == {1: 2.0, 4: 1.5}


def test_columnar_decode_rows_report_by_mode() -> None:
    """The columnar decode path (no group per row) reports the chosen token's value by the same
    modes: raw by default, after temperature and truncation when processed."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 1.5], [0.0, 0.3, 3.0, 0.1, -2.0]])
    rows = DecodeRows.build([SamplingParams(temperature=0.5, top_k=2),
                             SamplingParams(temperature=0.0)], [None, None], torch.device("cpu"))
    raw = torch.log_softmax(logits, dim=-1)
    for mode in LOGPROBS_MODES:
        samples = Sampler(logprobs_mode=mode).sample(logits, [], seeded(0), decode_rows=rows,
                                                     positions=torch.tensor([3, 3]))
        tokens, values = samples.assemble_decodes()
        assert tokens[0] in (1, 4) and tokens[1] == 2
        scaled = logits[0] / 0.5
        kept = torch.full_like(scaled, NEG_INF)
        kept[[1, 4]] = scaled[[1, 4]]
        want = {"raw_logprobs": raw[0, tokens[0]], "raw_logits": logits[0, tokens[0]],
                "processed_logprobs": torch.log_softmax(kept, dim=-1)[tokens[0]],
                "processed_logits": scaled[tokens[0]]}[mode]
        assert values[0] == pytest.approx(want.item(), abs=1e-6), mode
        greedy = raw[1, 2] if mode.endswith("logprobs") else logits[1, 2]
        assert values[1] == pytest.approx(greedy.item(), abs=1e-6), mode


def test_half_precision_logits_are_computed_in_float32() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.bfloat16)
    out = Sampler()(logits, [decode_group(SamplingParams(temperature=0.0, logprobs=3), [0])])
    got = [out[0].samples[0].logprobs[t] for t in range(3)]
    want = torch.log_softmax(logits.float()[0], dim=-1).tolist()
    assert got == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- random sampling

DIST = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.2])


def test_temperature_distribution() -> None:
    counts = draw_counts(DIST, SamplingParams(temperature=0.7), seed=11)
    assert_matches(counts, torch.softmax(DIST / 0.7, dim=-1))
    # The test can tell a missing temperature apart.
    stat, dof = chi_square(counts, torch.softmax(DIST, dim=-1))
    assert stat > CHI2_999[dof]


def test_top_k_draws_only_the_k_best_renormalized() -> None:
    counts = draw_counts(DIST, SamplingParams(temperature=1.3, top_k=3), seed=12)
    probs = torch.softmax(DIST / 1.3, dim=-1)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[[3, 7, 0]] = True
    assert_matches(counts, torch.where(keep, probs, 0.0) / probs[keep].sum())


def test_top_k_at_least_the_vocab_and_top_p_one_truncate_nothing() -> None:
    counts = draw_counts(DIST, SamplingParams(temperature=1.0, top_k=100, top_p=1.0), seed=17)
    assert_matches(counts, torch.softmax(DIST, dim=-1))


def test_top_p_draws_only_the_nucleus_renormalized() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    # Descending: 0.4, 0.25, 0.15 (mass 0.8 >= 0.7) | 0.1, 0.05, 0.05 are dropped.
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0, top_p=0.7), seed=13)
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.15, 0.0])
    assert_matches(counts, nucleus / nucleus.sum())


def test_top_p_always_keeps_the_top_token() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0, top_p=0.05), seed=14)
    assert counts.tolist() == [0, NUM_DRAWS, 0]


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    # Threshold 0.2 * 0.4 = 0.08: the two 0.05 tokens go.
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0, min_p=0.2), seed=15)
    kept = torch.tensor([0.0, 0.4, 0.1, 0.25, 0.15, 0.0])
    assert_matches(counts, kept / kept.sum())


def test_top_k_top_p_min_p_together() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    # top_k 4 -> {1, 3, 4, 2} renormalized by 0.9; top_p 0.8 of that -> {1, 3, 4}
    # (0.4 + 0.25 = 0.65 / 0.9 < 0.8); min_p 0.4 -> 0.15 < 0.16 goes.
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.4)
    counts = draw_counts(probs.log(), params, seed=16)
    kept = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.0, 0.0])
    assert_matches(counts, kept / kept.sum())


def test_min_p_applies_before_top_p_as_vllm() -> None:
    """min-p first, then top-p on the renormalized rest (vLLM's order): of 0.4 / 0.3 / 0.2 / 0.1,
    min-p 0.4 drops 0.1, and top-p 0.75 of the renormalized 0.44 / 0.33 / 0.22 keeps two tokens;
    top-p first would keep three (0.4 + 0.3 < 0.75)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0, top_p=0.75, min_p=0.4),
                         seed=21)
    assert_matches(counts, torch.tensor([0.4, 0.3, 0.0, 0.0]) / 0.7)


def test_seeded_draws_match_the_distribution() -> None:
    # Many rows, each with its own seed key (or the same key at other positions): the hashed
    # noise is unbiased too.
    num = 4000
    logits = DIST.unsqueeze(0).expand(num, -1)
    for keys, positions in [([seed_key(1000 + i, 0) for i in range(num)], [7] * num),
                            ([seed_key(5, 0)] * num, list(range(num)))]:
        group = decode_group(SamplingParams(temperature=1.0), list(range(num)), seed_keys=keys)
        out = Sampler()(logits, [group], positions=torch.tensor(positions))[0]
        counts = torch.bincount(torch.tensor([s.token_id for s in out.samples]), minlength=8)
        stat, dof = chi_square(counts.to(torch.float64), torch.softmax(DIST, dim=-1))
        assert stat < CHI2_999[dof]


# --------------------------------------------------------------------------- seeding

def manual_draw(logits_row: torch.Tensor, temperature: float, key: int, position: int) -> int:
    """The token the exponential race picks with the hashed noise of ``key`` at
    ``position``."""
    noise = hashed_exponential(torch.tensor([key]), torch.tensor([position]),
                               logits_row.numel())[0]
    return int((torch.log_softmax(logits_row / temperature, dim=-1) - noise.log()).argmax())


def test_hashed_noise_is_a_function_of_key_position_and_index() -> None:
    """The same (key, position) gives the same row on any batch; another key or position a
    different one; every value is finite and positive, with the mean and variance of Exp(1)."""
    keys = torch.tensor([seed_key(1, 0), seed_key(2, 0), seed_key(1, 1), seed_key(1, 0)])
    positions = torch.tensor([9, 9, 9, 10])
    noise = hashed_exponential(keys, positions, 50_000)
    again = hashed_exponential(keys[:1], positions[:1], 50_000)
    assert torch.equal(noise[0], again[0])
    for other in (1, 2, 3):
        assert (noise[0] != noise[other]).float().mean() > 0.99
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert noise.mean().item() == pytest.approx(1.0, abs=0.02)
    assert noise.var().item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="2 keys but 1 positions"):
        hashed_exponential(keys[:2], positions[:1], 10)


def test_seeded_draw_is_the_exponential_race_with_the_hashed_noise() -> None:
    logits = torch.randn(1, 1000, generator=seeded(5))
    for seed in range(5):
        group = decode_group(SamplingParams(temperature=0.9), [0], seed_keys=[seed_key(seed, 0)])
        token = Sampler()(logits, [group], positions=torch.tensor([12]))[0].samples[0].token_id
        assert token == manual_draw(logits[0], 0.9, seed_key(seed, 0), 12)


def test_seeded_tokens_do_not_depend_on_the_rest_of_the_batch() -> None:
    vocab = 1000
    logits = torch.randn(6, vocab, generator=seeded(6))
    positions = torch.arange(20, 26)
    params = SamplingParams(temperature=1.0, seed=42)

    def run_alone(row: int, key: int) -> int:
        group = decode_group(params, [0], seed_keys=[key])
        return Sampler()(logits[row: row + 1], [group],
                         positions=positions[row: row + 1])[0].samples[0].token_id

    alone = [run_alone(r, 100 + r) for r in range(4)]
    # The same rows in a shuffled batch with other seeded and unseeded requests around them.
    others = decode_group(SamplingParams(temperature=0.8, top_p=0.9), [4, 5],
                          seed_keys=[1, None], first_seq_id=200)
    mine = decode_group(params, [3, 1, 0, 2], seed_keys=[103, 101, 100, 102])
    greedy = decode_group(SamplingParams(temperature=0.0), [5], first_seq_id=300)
    out = Sampler()(logits, [others, greedy, mine], default_generator=seeded(9),
                    positions=positions)
    assert [s.token_id for s in out[2].samples] == [alone[3], alone[1], alone[0], alone[2]]
    # Different seeds do give different tokens here (the check above could fail).
    assert len(set(alone)) > 1


def test_seeded_samples_need_their_positions() -> None:
    group = decode_group(SamplingParams(temperature=1.0), [0], seed_keys=[3])
    with pytest.raises(ValueError, match="positions"):
        Sampler()(torch.randn(1, 10), [group])


def test_prompt_best_of_uses_one_seed_key_per_child() -> None:
    logits = torch.randn(1, 500, generator=seeded(8))
    keys = [seed_key(4, i) for i in range(3)]
    params = SamplingParams(n=2, best_of=3, temperature=1.0)
    group = prompt_group(params, 0, [4, 5, 6], seed_keys=list(keys))
    out = Sampler()(logits, [group], positions=torch.tensor([3]))[0]
    assert [s.token_id for s in out.samples] == [manual_draw(logits[0], 1.0, k, 3) for k in keys]
    assert [s.parent_seq_id for s in out.samples] == [7, 7, 7]
    lsm = torch.log_softmax(logits[0], dim=-1)
    for s in out.samples:
        assert s.cumulative_logprob == pytest.approx(lsm[s.token_id].item(), abs=1e-6)


def test_default_generator_makes_unseeded_draws_reproducible() -> None:
    logits = torch.randn(3, 1000, generator=seeded(10))
    group = decode_group(SamplingParams(temperature=1.0), [0, 1, 2])
    first = Sampler()(logits, [group], default_generator=seeded(77))[0]
    second = Sampler()(logits, [group], default_generator=seeded(77))[0]
    assert [s.token_id for s in first.samples] == [s.token_id for s in second.samples]


# --------------------------------------------------------------------------- beam search

def beam_params(width: int, logprobs: int | None = None) -> SamplingParams:
    """Beam search parameters of the given width."""
    return SamplingParams(n=width, best_of=width, temperature=0.0, use_beam_search=True,
                          logprobs=logprobs)


def test_beam_prompt_step_takes_top_2w_tokens() -> None:
    logits = torch.randn(2, 40, generator=seeded(30))
    group = prompt_group(beam_params(3), 1, [1, 2, 3])
    out = Sampler()(logits, [group])[0]
    lsm = torch.log_softmax(logits[1], dim=-1)
    want = torch.topk(lsm, 6)
    assert [s.token_id for s in out.samples] == want.indices.tolist()
    assert [s.parent_seq_id for s in out.samples] == [7] * 6
    assert [s.cumulative_logprob for s in out.samples] == pytest.approx(want.values.tolist(),
                                                                         abs=1e-6)


def test_beam_decode_step_matches_flattened_topk() -> None:
    vocab, width = 50, 3
    logits = torch.randn(4, vocab, generator=seeded(31)) * 3
    cumulative = [-1.0, -1.2, -4.0]
    params = beam_params(width, logprobs=2)
    group = decode_group(params, [2, 0, 3], cumulative=cumulative)
    out = Sampler()(logits, [group])[0]
    lsm = torch.log_softmax(logits[[2, 0, 3]], dim=-1)
    scores = torch.tensor(cumulative).unsqueeze(1) + lsm
    want = torch.topk(scores.view(-1), 2 * width)
    assert [(s.parent_seq_id, s.token_id) for s in out.samples] == [
        (100 + i // vocab, i % vocab) for i in want.indices.tolist()]
    for s in out.samples:
        beam = s.parent_seq_id - 100
        assert s.logprobs[s.token_id] == pytest.approx(lsm[beam, s.token_id].item(), abs=1e-6)
        assert len(s.logprobs) in (2, 3)
        assert s.cumulative_logprob == pytest.approx(
            cumulative[beam] + lsm[beam, s.token_id].item(), abs=1e-5)
    values = [s.cumulative_logprob for s in out.samples]
    assert values == sorted(values, reverse=True)


def test_beam_ties_break_like_torch_topk_over_beam_major_scores() -> None:
    vocab, width = 6, 2
    row = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, -1.0])
    logits = torch.stack([row, row])
    group = decode_group(beam_params(width), [0, 1], cumulative=[-2.0, -2.0])
    out = Sampler()(logits, [group])[0]
    scores = torch.tensor([-2.0, -2.0]).unsqueeze(1) + torch.log_softmax(logits, dim=-1)
    want = torch.topk(scores.view(-1), 2 * width).indices.tolist()
    assert [(s.parent_seq_id - 100) * vocab + s.token_id for s in out.samples] == want


def test_beam_search_applies_penalties() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])
    params = dataclasses.replace(beam_params(2), repetition_penalty=2.0)
    group = decode_group(params, [0], outputs=[[1]], prompt=[3])
    out = Sampler()(logits, [group])[0]
    penalized_row = torch.tensor([0.0, 1.5, 2.0, -2.0])  # unpenalized order: 1, 2, 0, 3
    want = torch.topk(torch.log_softmax(penalized_row, dim=-1), 4).indices.tolist()
    assert [s.token_id for s in out.samples] == want


# --------------------------------------------------------------------------- prompt logprobs

def test_prompt_logprobs_values_and_shape() -> None:
    vocab = 30
    prompt = [4, 9, 9, 17, 2]
    logits = torch.randn(6, vocab, generator=seeded(40)) * 2
    params = SamplingParams(temperature=0.0, prompt_logprobs=2, repetition_penalty=1.7)
    group = prompt_group(params, 5, prompt, prompt_rows=[1, 2, 3, 4])
    out = Sampler()(logits, [group])[0]
    # One entry per prompt row: the model runner adds the leading None of the first token.
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt) - 1
    raw = torch.log_softmax(logits, dim=-1)  # no penalties, no temperature
    for position, row in zip(range(1, 5), [1, 2, 3, 4]):
        entry = out.prompt_logprobs[position - 1]
        assert entry is not None
        top = set(torch.topk(raw[row], 2).indices.tolist())
        assert set(entry) == top | {prompt[position]}
        for token, value in entry.items():
            assert value == pytest.approx(raw[row, token].item(), abs=1e-6)


def test_prompt_logprobs_absent_unless_asked_and_at_prompt_step() -> None:
    logits = torch.randn(3, 10, generator=seeded(41))
    asked = prompt_group(SamplingParams(temperature=0.0, prompt_logprobs=0), 2, [1, 2, 3],
                         prompt_rows=[0, 1])
    not_asked = prompt_group(SamplingParams(temperature=0.0), 2, [1, 2, 3], prompt_rows=[0, 1])
    decode = decode_group(SamplingParams(temperature=0.0, prompt_logprobs=1), [2])
    out = Sampler()(logits, [asked, not_asked, decode])
    assert out[0].prompt_logprobs is not None
    assert [None if e is None else list(e) for e in out[0].prompt_logprobs] == [[2], [3]]
    assert out[1].prompt_logprobs is None and out[2].prompt_logprobs is None


# --------------------------------------------------------------------------- mixed batches

def test_mixed_batch_gives_each_group_what_it_gets_alone() -> None:
    vocab = 64
    logits = torch.randn(7, vocab, generator=seeded(50))

    def groups() -> list[SamplingGroup]:
        return [
            decode_group(SamplingParams(temperature=0.0, logprobs=1), [6, 1]),
            prompt_group(SamplingParams(n=2, best_of=2, temperature=0.7, top_k=10, logprobs=3,
                                        prompt_logprobs=1),
                         3, [5, 6], seed_keys=[1, 2], prompt_rows=[2],
                         seq_id=9),
            decode_group(beam_params(2, logprobs=2), [0, 5], cumulative=[-0.5, -0.7],
                         first_seq_id=400),
            prompt_group(beam_params(2), 0, [1, 2], seq_id=600),
            decode_group(beam_params(2), [5, 3], cumulative=[-1.5, -0.2], first_seq_id=700),
            decode_group(SamplingParams(temperature=1.1, min_p=0.05, presence_penalty=1.0),
                         [4], outputs=[[3, 3]], seed_keys=[3], first_seq_id=500),
        ]

    positions = torch.arange(30, 37)
    batched = Sampler()(logits, groups(), positions=positions)
    for i, group in enumerate(groups()):
        alone = Sampler()(logits, [group], positions=positions)[0]
        assert batched[i] == alone
    assert len(batched[2].samples) == 4
    assert batched[1].prompt_logprobs is not None and len(batched[1].prompt_logprobs) == 1


def test_empty_batch_and_padded_vocab() -> None:
    assert Sampler()(torch.zeros(0, 5), []) == []
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0]])  # column 3 is vocabulary padding
    out = Sampler(vocab_size=3)(logits, [decode_group(SamplingParams(temperature=0.0,
                                                                     logprobs=5), [0])])[0]
    assert out.samples[0].token_id == 2
    assert sorted(out.samples[0].logprobs) == [0, 1, 2]
    assert math.isclose(sum(math.exp(v) for v in out.samples[0].logprobs.values()), 1.0,
                        rel_tol=1e-6)
