"""The tensor-parallel executors on CPU (gloo): tp = 2 gives the tokens of tp = 1; failures of
a worker end the engine with an error naming the rank and leave no process behind; sizes the
model cannot take are refused before any process starts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from distributed_testutil import child_pids
from executor_testutil import greedy_steps
from tp_testmodel import save_tiny_tp_checkpoint, tiny_config, tiny_model_config

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cacheflow_runtime.core.step_data import ScheduledRequest, ScheduledSequence, SchedulerOutput
from cacheflow_runtime.executor.base import Executor
from cacheflow_runtime.executor.factory import check_tensor_parallel, create_executor
from cacheflow_runtime.executor.in_process import InProcessExecutor
from cacheflow_runtime.executor.multiproc import MultiprocExecutor
from cacheflow_runtime.executor.rank_worker import WorkerFailedError
from cacheflow_runtime.layers.linear import QKVParallelLinear

PROMPTS = [[5, 1, 30, 7, 2, 36, 11, 4, 9], [3], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 0, 1]]
MAX_TOKENS = 6
# A failure must end the engine within 60 s (issue 11); the tests give CI 2x slack on the
# heartbeat timeout they set, far below that.
FAILURE_DEADLINE_S = 60.0


def _executor(model_config: ModelConfig, tp: int, backend: str | None = None) -> Executor:
    executor = create_executor(model_config, CacheConfig(block_size=8, num_device_blocks=32,
                                                         num_cpu_blocks=4),
                               SchedulerConfig(max_model_len=64), ParallelConfig(tp, backend),
                               torch.device("cpu"))
    blocks = executor.determine_num_available_blocks()
    executor.initialize_cache(*blocks)
    return executor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    config = tiny_config()
    return tiny_model_config(save_tiny_tp_checkpoint(tmp_path_factory.mktemp("tinytp"), config),
                             config)


@pytest.fixture(scope="module")
def reference_tokens(tiny: ModelConfig) -> list[list[int]]:
    executor = _executor(tiny, 1)
    assert isinstance(executor, InProcessExecutor)
    return greedy_steps(executor, PROMPTS, MAX_TOKENS)


def test_mp_tp2_matches_tp1(tiny: ModelConfig, reference_tokens: list[list[int]]) -> None:
    executor = _executor(tiny, 2, "mp")
    try:
        assert isinstance(executor, MultiprocExecutor)
        assert executor.backend == "gloo (torch.distributed)"
        assert executor.determine_num_available_blocks() == (32, 4)
        assert greedy_steps(executor, PROMPTS, MAX_TOKENS) == reference_tokens
        pids = [p.pid for p in executor.processes]
        assert set(pids) <= child_pids()
    finally:
        executor.shutdown()
    assert not set(pids) & child_pids()
    executor.shutdown()  # idempotent


def test_killed_worker_fails_the_step_naming_its_rank(tiny: ModelConfig) -> None:
    executor = _executor(tiny, 2, "mp")
    assert isinstance(executor, MultiprocExecutor)
    pids = [p.pid for p in executor.processes]
    assert pids[1] is not None

    def kill_rank_1(step: int) -> None:
        if step == 1:
            os.kill(pids[1], signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        greedy_steps(executor, PROMPTS, MAX_TOKENS, after_step=kill_rank_1)
    assert time.monotonic() - start < FAILURE_DEADLINE_S
    assert info.value.rank == 1
    assert "rank 1" in str(info.value) and "SIGKILL" in str(info.value)
    assert not set(pids) & child_pids()
    # the executor stays failed: later calls raise the same error at once
    with pytest.raises(WorkerFailedError, match="rank 1"):
        executor.execute_model(SchedulerOutput())


def test_hung_worker_fails_the_step_naming_its_rank(tiny: ModelConfig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEFLOW_WORKER_TIMEOUT_S", "3")
    executor = _executor(tiny, 2, "mp")
    assert isinstance(executor, MultiprocExecutor)
    pids = [p.pid for p in executor.processes]
    assert pids[1] is not None
    start = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    with pytest.raises(WorkerFailedError) as info:
        greedy_steps(executor, PROMPTS, MAX_TOKENS)
    assert time.monotonic() - start < FAILURE_DEADLINE_S
    assert info.value.rank == 1
    assert "has not responded" in str(info.value)
    assert not set(pids) & child_pids()


def test_worker_exception_is_reported_with_its_traceback(tiny: ModelConfig) -> None:
    executor = _executor(tiny, 2, "mp")
    try:
        bad = SchedulerOutput(scheduled=[ScheduledRequest(
            "never-added", [ScheduledSequence(0, [1], 0, block_ids=[0], output_token_ids=[])],
            do_sample=True)])
        with pytest.raises(WorkerFailedError) as info:
            executor.execute_model(bad)
        assert info.value.rank in (0, 1)
        assert "KeyError" in str(info.value) and "never-added" in str(info.value)
    finally:
        executor.shutdown()


@pytest.mark.parametrize("overrides, tp, message", [
    (dict(), 3, "does not divide the model's 4 attention heads"),
    (dict(num_heads=6, num_kv_heads=3), 2, "3 KV heads do not divide"),
    (dict(intermediate_size=47), 2, "output size (47) is not divisible"),
])
def test_bad_tensor_parallel_size_is_refused_before_any_process(
        tmp_path: Path, overrides: dict[str, int], tp: int, message: str) -> None:
    config = tiny_config(**overrides)
    model_config = tiny_model_config(tmp_path, config)  # no checkpoint needed: nothing loads
    before = child_pids()
    with pytest.raises(ValueError) as info:
        _executor(model_config, tp, "mp")
    assert message in str(info.value)
    assert f"tensor_parallel_size={tp}" in str(info.value)
    assert child_pids() == before


def test_fewer_kv_heads_than_ranks_are_replicated(tiny: ModelConfig) -> None:
    # 1 KV head over 4 ranks: accepted, and every rank holds the same copy of it
    check_tensor_parallel(tiny, ParallelConfig(4, "mp"), torch.device("cpu"))
    torch.manual_seed(0)
    fused = torch.randn((4 + 2 * 1) * 8, 32)
    shards = []
    for rank in range(4):
        with ps.tensor_parallel_shard(4, rank):
            layer = QKVParallelLinear(32, 8, 4, 1, bias=False)
            layer.weight_loader(layer.weight, fused)
        assert (layer.num_heads, layer.num_kv_heads, layer.kv_replicas) == (1, 1, 4)
        shards.append(layer.weight.data)
    for rank, shard in enumerate(shards):
        assert torch.equal(shard[:8], fused[rank * 8:(rank + 1) * 8])  # its own query head
        assert torch.equal(shard[8:], fused[32:])  # the one K and V head


@pytest.mark.slow  # a local Ray cluster takes 10-20 s to start on a 2-core machine
def test_ray_tp2_matches_tp1(tiny: ModelConfig, reference_tokens: list[list[int]]) -> None:
    ray = pytest.importorskip("ray")
    # the actors import the test model from this folder
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    try:
        executor = _executor(tiny, 2, "ray")
        try:
            assert executor.determine_num_available_blocks() == (32, 4)
            assert greedy_steps(executor, PROMPTS, MAX_TOKENS) == reference_tokens
        finally:
            executor.shutdown()
    finally:
        ray.shutdown()
