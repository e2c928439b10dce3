"""Beam search equals HF transformers' beam search; seeded sampling is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cacheflow_models.testing import run_engine, save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("beam"), tiny_llama_config())


def hf_beams(path: Path, prompt: list[int], beams: int, max_new_tokens: int,
             length_penalty: float, eos: int | None) -> tuple[list[list[int]], list[float]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = eos
    out = model.generate(torch.tensor([prompt]), num_beams=beams, num_return_sequences=beams,
                         max_new_tokens=max_new_tokens, do_sample=False,
                         length_penalty=length_penalty, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    seqs = []
    for row in out.sequences:
        tokens = row[len(prompt):].tolist()
        if eos is not None and eos in tokens:  # HF pads finished beams after EOS
            tokens = tokens[:tokens.index(eos) + 1]
        while tokens and tokens[-1] == 0:
            tokens.pop()
        seqs.append(tokens)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_hf(tiny: Path, prompt_batch: list[list[int]],
                                length_penalty: float) -> None:
    prompts = prompt_batch[1:4]
    params = SamplingParams(n=4, best_of=4, use_beam_search=True, temperature=0,
                            max_tokens=12, ignore_eos=True, length_penalty=length_penalty)
    outputs = run_engine(tiny, prompts, params)
    for prompt, out in zip(prompts, outputs):
        ref, ref_scores = hf_beams(tiny, prompt, 4, 12, length_penalty, None)
        assert [c.token_ids for c in out.outputs] == ref
        ours = [c.cumulative_logprob / len(c.token_ids) ** length_penalty for c in out.outputs]
        assert ours == pytest.approx(ref_scores, abs=1e-4)


def test_beam_search_with_eos_matches_hf(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    # An EOS id that a random model picks often enough to end some beams early.
    path = save_tiny_checkpoint(tmp_path / "eos", tiny_llama_config(), seed=3)
    prompts = prompt_batch[:4]
    greedy = run_engine(path, prompts, SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True))
    eos = greedy[1].outputs[0].token_ids[3]
    config = tiny_llama_config(eos_token_id=eos)
    path = save_tiny_checkpoint(tmp_path / "eos2", config, seed=3)
    params = SamplingParams(n=4, best_of=4, use_beam_search=True, temperature=0, max_tokens=10)
    outputs = run_engine(path, prompts, params)
    ended_early = 0
    for prompt, out in zip(prompts, outputs):
        ref, _ = hf_beams(path, prompt, 4, 10, 1.0, eos)
        assert [c.token_ids for c in out.outputs] == ref
        ended_early += sum(c.token_ids[-1] == eos for c in out.outputs)
    assert ended_early > 0


def test_seeded_sampling_reproducible_and_batch_independent(
        tiny: Path, prompt_batch: list[list[int]]) -> None:
    seeded = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=77, max_tokens=20,
                            ignore_eos=True)
    alone = run_engine(tiny, [prompt_batch[2]], seeded)[0]
    again = run_engine(tiny, [prompt_batch[2]], seeded)[0]
    others = SamplingParams(n=2, temperature=1.3, max_tokens=25, ignore_eos=True)
    mixed = run_engine(tiny, [prompt_batch[0], prompt_batch[2], prompt_batch[4]],
                       [others, seeded, others])[1]
    tokens = [c.token_ids for c in alone.outputs]
    assert tokens == [c.token_ids for c in again.outputs]
    assert tokens == [c.token_ids for c in mixed.outputs]
    assert len({tuple(t) for t in tokens}) == 3  # three distinct samples
    other_seed = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=78, max_tokens=20,
                                ignore_eos=True)
    assert [c.token_ids for c in run_engine(tiny, [prompt_batch[2]], other_seed)[0].outputs] \
        != tokens
