"""Helpers shared by the cacheflow-serve tests (imported by the test modules, not a conftest)."""

from __future__ import annotations

from cacheflow_runtime import RequestOutput
from cacheflow_serve import LLM

# A chat template for the byte tokenizer (which ships none), so that ``--chat`` can be tested.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def assert_idle(llm: LLM) -> None:
    """No request is left in the engine and every KV block (GPU and CPU) is free."""
    engine = llm.engine
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert bm.get_num_free_gpu_blocks() == bm.num_total_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_total_cpu_blocks


def completions(outputs: list[RequestOutput]) -> list[list[tuple[list[int], str, str | None]]]:
    """(token ids, text, finish reason) of every returned sequence of every request."""
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for out in outputs]
