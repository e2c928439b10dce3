"""choice_events: the chunks a streamed completion sends per choice. The first chunk of a choice
is the one an echo goes in front of, also when the choice's first outputs carry no text yet
(the bytes of an unfinished character held back, or a tail that may become a stop string)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from cacheflow_serve.server.streaming import choice_events


def _outputs(texts: list[str]) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        for i, text in enumerate(texts):
            last = i == len(texts) - 1
            comp = SimpleNamespace(index=0, text=text, token_ids=list(range(i + 1)),
                                   logprobs=None, finish_reason="length" if last else None,
                                   stop_reason=None)
            yield SimpleNamespace(outputs=[comp], finished=last, prompt_logprobs=None,
                                  prompt_token_ids=[7, 8, 9])
    return gen()


def _events(texts: list[str], stop_strings: list[str]) -> list[tuple[str, bool, Any]]:
    async def collect() -> list[tuple[str, bool, Any]]:
        finals: list[Any] = [None]
        return [(ev.text, ev.first, ev.finish_reason) async for ev in choice_events(
            [_outputs(texts)], 1, stop_strings, finals, False)]  # type: ignore[list-item]
    return asyncio.run(collect())


def test_first_chunk_is_the_first_sent_after_outputs_without_text() -> None:
    assert _events(["", "", "ab", "abc"], []) == [
        ("ab", True, None), ("c", False, "length")]


def test_first_chunk_after_a_held_back_stop_string_prefix() -> None:
    # "x" could start the stop string "xy": held back until the text moves past it.
    assert _events(["x", "xa", "xab"], ["xy"]) == [("xa", True, None), ("b", False, "length")]


def test_a_choice_finishing_without_text_still_sends_one_first_chunk() -> None:
    assert _events(["", ""], []) == [("", True, "length")]


def test_events_carry_the_prompt_length_and_the_tokens_so_far() -> None:
    """What continuous usage stats report per chunk: the choice's prompt length and its tokens
    up to this chunk (the fake outputs have i + 1 tokens at output i)."""
    async def collect() -> list[tuple[int, int]]:
        finals: list[Any] = [None]
        return [(ev.prompt_tokens, ev.completion_tokens) async for ev in choice_events(
            [_outputs(["a", "", "ab", "abc"])], 1, [], finals, False)]  # type: ignore[list-item]
    assert asyncio.run(collect()) == [(3, 1), (3, 3), (3, 4)]
