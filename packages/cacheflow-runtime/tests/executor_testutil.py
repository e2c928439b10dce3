"""Driving an executor through the plain-data step interface by hand: greedy decoding of a
batch, with one block table per sequence and no scheduler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from cacheflow_runtime.core.step_data import (
    NewRequestData,
    ScheduledRequest,
    ScheduledSequence,
    SchedulerOutput,
)
from cacheflow_runtime.executor.base import Executor
from cacheflow_runtime.sampling_params import SamplingParams


def greedy_steps(executor: Executor, prompts: list[list[int]], max_tokens: int,
                 block_size: int = 8,
                 after_step: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """Prefills every prompt in one step, then decodes ``max_tokens - 1`` steps; returns each
    prompt's generated token ids. ``after_step(i)`` runs after step i."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tables, next_block = [], 0
    for prompt in prompts:
        count = -(-(len(prompt) + max_tokens) // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(max_tokens):
        scheduled = []
        for i, prompt in enumerate(prompts):
            if step == 0:
                seq = ScheduledSequence(i, list(prompt), 0, block_ids=tables[i],
                                        output_token_ids=[])
            else:
                seq = ScheduledSequence(i, [outputs[i][-1]], len(prompt) + step - 1,
                                        new_output_token_ids=[outputs[i][-1]])
            scheduled.append(ScheduledRequest(str(i), [seq], do_sample=True,
                                              is_first_sample=step == 0))
        new = ([NewRequestData(str(i), list(p), params) for i, p in enumerate(prompts)]
               if step == 0 else [])
        result = executor.execute_model(SchedulerOutput(new_requests=new, scheduled=scheduled))
        for i in range(len(prompts)):
            outputs[i].append(result.samples[str(i)].samples[0].token_id)
        if after_step is not None:
            after_step(step)
    return outputs
