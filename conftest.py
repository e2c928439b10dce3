"""Options shared by every package's tests when pytest runs from the repository root.

``--engine-features=off`` builds every engine with prefix caching and chunked prefill off (the
step behaviour before runtime core v2), so that the same suites check both settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--engine-features", choices=["default", "off"], default="default",
                     help="'off': every engine runs with enable_prefix_caching=False and "
                          "enable_chunked_prefill=False")


@pytest.fixture(scope="session", autouse=True)
def _engine_features(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.config.getoption("--engine-features") != "off":
        yield
        return
    from cacheflow_runtime.engine.llm_engine import LLMEngine

    original = LLMEngine.__init__

    def init(self: Any, model_config: Any, cache_config: Any, scheduler_config: Any,
             *args: Any, **kwargs: Any) -> None:
        cache_config = dataclasses.replace(cache_config, enable_prefix_caching=False)
        budget = max(scheduler_config.max_num_batched_tokens, scheduler_config.max_model_len)
        scheduler_config = dataclasses.replace(scheduler_config, enable_chunked_prefill=False,
                                               max_num_batched_tokens=budget)
        original(self, model_config, cache_config, scheduler_config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LLMEngine, "__init__", init)
        yield
