"""``cacheflow bench throughput`` and ``cacheflow bench latency`` in CPU smoke mode: the JSON
reports exact counts and floors that follow from the measured bandwidth and matmul rate; bad
options are one-line errors before anything loads."""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from cacheflow_serve import LLM, __version__, bench_latency
from cacheflow_serve.bench_common import LengthSpec, SyntheticRequest, synthetic_requests
from cacheflow_serve.bench_gpu_busy import (
    idle_gaps,
    measure_gpu_busy,
    top_device_ops,
    union_seconds,
)
from cacheflow_serve.bench_latency import StepClock, floors
from cacheflow_serve.bench_step_trace import floors_from_trace
from cacheflow_serve.cli import main

from serve_testutil import assert_idle

ONE_TORCH_THREAD = True  # see conftest.py
SMOKE = ["--random-weights", "--hf-config", "tiny", "--device", "cpu", "--kv-cache-blocks", "64",
         "--disable-tqdm"]
TINY_PARAMETERS = 139_584  # see test_random_checkpoint.py
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, float32


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    assert main([*args, *SMOKE, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_environment(report: dict[str, Any]) -> None:
    env = report["environment"]
    assert env["card"].startswith("CPU") and env["device"] == "cpu"
    assert env["torch"] == torch.__version__
    assert env["versions"]["cacheflow-serve"] == __version__
    date = datetime.datetime.fromisoformat(env["date"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(hours=1)
    model = report["model"]
    assert model["random_weights"] and model["hf_config"] == "tiny"
    assert model["parameters"] == TINY_PARAMETERS
    assert model["parameter_bytes"] == 4 * TINY_PARAMETERS  # float32 on the CPU
    assert model["kv_bytes_per_token"] == TINY_KV_BYTES_PER_TOKEN


def test_throughput_counts_are_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run(tmp_path, "bench", "throughput", "--num-prompts", "4", "--input-len", "8",
                  "--output-len", "4")
    _check_environment(report)
    engine = report["results"]["engine"]
    assert (engine["num_requests"], engine["prompt_tokens"], engine["output_tokens"],
            engine["total_tokens"], engine["outputs_short_or_long"]) == (4, 32, 16, 48, 0)
    assert engine["output_tokens_per_s"] == pytest.approx(16 / engine["elapsed_s"])
    assert engine["total_tokens_per_s"] == pytest.approx(48 / engine["elapsed_s"])
    assert engine["requests_per_s"] == pytest.approx(4 / engine["elapsed_s"])
    assert report["workload"] == {"num_prompts": 4, "input_len": "8", "output_len": "4",
                                  "seed": 0, "sampling": "greedy, ignore_eos"}
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("CPU") and "0.14M parameters" in table[0]
    assert table[2].split()[0] == "engine" and table[2].split()[-2:] == ["32", "16"]


def test_throughput_step_trace_accounts_for_every_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--step-trace: the traced steps compute every token once (a request computes its prompt
    and every output token but the last); a small budget makes mixed steps; floors follow from
    the rates of the same run."""
    trace = tmp_path / "steps.jsonl"
    report = _run(tmp_path, "bench", "throughput", "--num-prompts", "6", "--input-len", "8:40",
                  "--output-len", "3:6", "--max-num-batched-tokens", "16",
                  "--step-trace", str(trace))
    engine = report["results"]["engine"]
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    computed = sum(s["prompt_tokens"] + s["decode_rows"] for s in steps)
    assert computed == engine["prompt_tokens"] + engine["output_tokens"] - 6
    # a one-token prompt chunk counts as a decode row (attention treats it as one)
    assert sum(s["decode_rows"] for s in steps) >= engine["output_tokens"] - 6
    assert all(s["decode_rows"] + s["prompt_tokens"] <= 16 for s in steps)
    kinds = {s["kind"] for s in steps}
    assert {"mixed", "decode"} <= kinds
    info = engine["step_trace"]
    bandwidth, flops = info["copy_bytes_per_s"], info["matmul_flops_per_s"]
    decode = next(s for s in steps if s["kind"] == "decode")
    memory = (4 * TINY_PARAMETERS + decode["decode_context_tokens"] * TINY_KV_BYTES_PER_TOKEN) \
        / bandwidth
    compute = 2 * TINY_PARAMETERS * decode["decode_rows"] / flops
    assert decode["floor_s"] == pytest.approx(max(memory, compute))
    # serial: the K/V read, then the projections at the larger of their weights and FLOPs
    kv_read = decode["decode_context_tokens"] * TINY_KV_BYTES_PER_TOKEN / bandwidth
    assert decode["serial_floor_s"] == pytest.approx(
        kv_read + max(4 * TINY_PARAMETERS / bandwidth, compute))
    mixed = next(s for s in steps if s["kind"] == "mixed")
    model = report["model"]
    assert (model["num_layers"], model["num_attention_heads"], model["head_size"]) == (2, 4, 16)
    pairs_flops = 4 * 2 * 4 * 16 * mixed["prompt_attention_pairs"]
    projections = 2 * TINY_PARAMETERS * (mixed["decode_rows"] + mixed["prompt_tokens"]) / flops
    kv_read = mixed["decode_context_tokens"] * TINY_KV_BYTES_PER_TOKEN / bandwidth
    assert mixed["serial_floor_s"] == pytest.approx(
        kv_read + max(4 * TINY_PARAMETERS / bandwidth, projections) + pairs_flops / flops)
    assert all(s["serial_floor_s"] >= s["floor_s"] * (1 - 1e-9) for s in steps)
    by_kind = info["by_kind"]
    assert sum(row["steps"] for row in by_kind.values()) == len(steps)
    assert sum(row["seconds"] for row in by_kind.values()) <= engine["elapsed_s"] * 1.001
    assert by_kind["mixed"]["mean_prompt_tokens"] > 0 and by_kind["mixed"]["mean_decode_rows"] > 0
    assert sum(s["preemptions"] for s in steps) == engine["preemptions"]
    out = capsys.readouterr().out
    assert f"per-step trace: {trace}" in out and "\nmixed " in out and "\nall " in out
    # The trace file alone gives the same floors again (and others for another card's rates).
    again = floors_from_trace(trace, model, bandwidth, flops)
    for kind, row in by_kind.items():
        assert again[kind]["steps"] == row["steps"]
        assert again[kind]["floor_s"] == pytest.approx(row["floor_s"])
        assert again[kind]["serial_floor_s"] == pytest.approx(row["serial_floor_s"])
    slower = floors_from_trace(trace, model, bandwidth / 2, flops / 2)
    assert slower["decode"]["serial_floor_s"] == pytest.approx(
        2 * by_kind["decode"]["serial_floor_s"])


def test_step_trace_counts_the_preemptions_of_each_step(tiny_path: Path, tmp_path: Path) -> None:
    """A cache too small for the batch: the steps that preempted say so, and they add up to the
    scheduler's count over the run."""
    from cacheflow_serve.bench_common import model_summary
    from cacheflow_serve.bench_throughput import run_engine

    device = torch.device("cpu")
    _, summary = model_summary(tiny_path, "float32", device, None)
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=12, block_size=16,
              max_num_seqs=8)
    rng = random.Random(0)
    requests = [SyntheticRequest([rng.randrange(3, 250) for _ in range(30)], 40)
                for _ in range(8)]
    warmup = [SyntheticRequest([5, 6, 7], 2)]
    result = run_engine(llm, requests, warmup, device, False, (tmp_path / "s.jsonl", summary))
    steps = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert result["outputs_short_or_long"] == 0
    assert result["preemptions"] > 0
    assert sum(s["preemptions"] for s in steps) == result["preemptions"]
    assert result["preemptions"] == llm.engine.scheduler.num_preemptions


def test_throughput_with_length_ranges_and_hf_baseline(tmp_path: Path) -> None:
    report = _run(tmp_path, "bench", "throughput", "--num-prompts", "5", "--input-len", "3:12",
                  "--output-len", "2:6", "--seed", "7", "--baseline", "hf",
                  "--hf-max-batch-size", "2")
    # The same seed draws the same lengths (prompt ids: the 512-token vocabulary less 0-2).
    want = synthetic_requests(5, LengthSpec(3, 12), LengthSpec(2, 6), list(range(3, 512)), 7)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in want)
    output_tokens = sum(r.output_len for r in want)
    assert len({r.output_len for r in want}) > 1  # the range really varies
    for run in ("engine", "hf"):
        got = report["results"][run]
        assert (got["prompt_tokens"], got["output_tokens"]) == (prompt_tokens, output_tokens)
    # HF rows run to their batch's longest output: batches of 2, 2 and 1.
    assert report["results"]["hf"]["generated_tokens"] == sum(
        len(batch) * max(r.output_len for r in batch) for batch in (want[:2], want[2:4], want[4:]))
    assert report["results"]["engine"]["outputs_short_or_long"] == 0


@pytest.mark.parametrize("bench", ["throughput", "latency", "prefix-caching"])
def test_disable_detokenize_skips_the_detokenizer(bench: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--disable-detokenize``: the same run with SamplingParams.detokenize=False (the
    detokenizer is never called), said in the report."""
    from cacheflow_runtime.engine.detokenizer import Detokenizer

    calls: list[str] = []
    for name in ("decode_output", "decode_rest_at_once", "decode_new_text"):
        original = getattr(Detokenizer, name)

        def counted(self: Any, *args: Any, _name: str = name, _f: Any = original) -> Any:
            calls.append(_name)
            return _f(self, *args)
        monkeypatch.setattr(Detokenizer, name, counted)
    args = {"throughput": ["--num-prompts", "3"], "prefix-caching": ["--num-prompts", "3",
                                                                      "--prefix-len", "8"],
            "latency": ["--batch-sizes", "2", "--num-iters", "1", "--num-iters-warmup", "0"]
            }[bench]
    report = _run(tmp_path, "bench", bench, *args, "--input-len", "6", "--output-len", "5",
                  "--disable-detokenize")
    assert calls == []
    assert report["workload"]["sampling"] == "greedy, ignore_eos, detokenize=False"
    if bench == "throughput":
        engine = report["results"]["engine"]
        assert (engine["output_tokens"], engine["outputs_short_or_long"]) == (15, 0)
    _run(tmp_path, "bench", bench, *args, "--input-len", "6", "--output-len", "5")
    assert calls  # without the flag the outputs are decoded


def test_throughput_on_a_model_path(tiny_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert main(["bench", "throughput", "--model", str(tiny_path), "--device", "cpu",
                 "--kv-cache-blocks", "32", "--disable-tqdm", "--num-prompts", "3",
                 "--input-len", "5", "--output-len", "3", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["path"] == str(tiny_path) and not report["model"]["random_weights"]
    assert report["model"]["vocab_size"] == 259
    engine = report["results"]["engine"]
    assert (engine["prompt_tokens"], engine["output_tokens"]) == (15, 9)


def test_engine_options_reach_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks take every LLM keyword under its `cacheflow generate` flag
    (engine_args.py), pass it to LLM and name it in the report."""
    import cacheflow_serve.llm as llm_module

    seen: dict[str, Any] = {}

    class RecordingLLM(llm_module.LLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llm_module, "LLM", RecordingLLM)
    report = _run(tmp_path, "bench", "throughput", "--num-prompts", "3", "--input-len", "6",
                  "--output-len", "4", "--kv-cache-dtype", "fp8", "--block-size", "8",
                  "--preemption-mode", "swap", "--max-num-batched-tokens", "64")
    assert (seen["kv_cache_dtype"], seen["block_size"], seen["preemption_mode"],
            seen["max_num_batched_tokens"], seen["kv_cache_blocks"]) == ("fp8", 8, "swap", 64, 64)
    assert report["engine_args"]["kv_cache_dtype"] == "fp8"
    assert report["engine_args"]["block_size"] == 8
    engine = report["results"]["engine"]
    assert (engine["output_tokens"], engine["outputs_short_or_long"]) == (12, 0)


def test_reports_state_the_engine_args_the_engine_ran_with(tmp_path: Path) -> None:
    """``engine_args`` holds the values the engine ran with, defaults resolved (the README's
    list), not only the flags given."""
    report = _run(tmp_path, "bench", "throughput", "--num-prompts", "2", "--input-len", "4",
                  "--output-len", "2", "--block-size", "8")
    args = report["engine_args"]
    assert {k: args[k] for k in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_blocks",
                                 "block_size", "kv_cache_dtype", "enforce_eager",
                                 "enable_prefix_caching", "enable_chunked_prefill",
                                 "tensor_parallel_size")} == {
        "max_num_seqs": 256, "max_num_batched_tokens": 2048, "kv_cache_blocks": 64,
        "block_size": 8, "kv_cache_dtype": "auto", "enforce_eager": False,
        "enable_prefix_caching": True, "enable_chunked_prefill": True,
        "tensor_parallel_size": 1}
    assert args["max_model_len"] == report["model"]["max_model_len"] == 512


def test_benchmarks_draw_prompts_from_the_given_tokenizer(tiny_path: Path, tmp_path: Path
                                                          ) -> None:
    """``--tokenizer`` (a checkpoint whose tokenizer lives elsewhere) serves the benchmark's
    prompts too, as it serves the engine."""
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(tiny_path, weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt"):
        (weights / name).unlink(missing_ok=True)
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--model", str(weights), "--tokenizer", str(tiny_path),
                 "--device", "cpu", "--kv-cache-blocks", "32", "--disable-tqdm",
                 "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                 "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["engine"]["output_tokens"] == 4


def test_latency_reports_steps_next_to_the_floors(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    report = _run(tmp_path, "bench", "latency", "--batch-sizes", "3,1", "--input-len", "8",
                  "--output-len", "4", "--num-iters", "1", "--num-iters-warmup", "0")
    _check_environment(report)
    dev = report["device_measurements"]
    assert dev["matmul_dtype"] == "float32" and dev["bytes_per_s"] > 0 and dev["flops_per_s"] > 0
    rows = report["results"]["engine"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        b = r["batch_size"]
        assert r["output_tokens_per_run"] == 4 * b
        assert r["kv_bytes"] == b * (8 + 4 / 2) * TINY_KV_BYTES_PER_TOKEN
        assert r["memory_floor_s"] == pytest.approx(
            (4 * TINY_PARAMETERS + r["kv_bytes"]) / dev["bytes_per_s"])
        assert r["matmul_floor_s"] == pytest.approx(2 * TINY_PARAMETERS * b / dev["flops_per_s"])
        assert r["decode_step_s"] == pytest.approx((r["generate_s"] - r["prefill_s"]) / 3)
        assert r["step_over_memory_floor"] == pytest.approx(
            r["decode_step_s"] / r["memory_floor_s"])
        assert r["step_over_max_floor"] == pytest.approx(
            r["decode_step_s"] / max(r["memory_floor_s"], r["matmul_floor_s"]))
        assert "gpu_idle_fraction" not in r  # measured on CUDA only
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:3] == ["batch", "step", "ms"]
    # Four tokens make too few steps for a steady window; no GPU, no idle share.
    assert "GPU idle" in lines[3] and lines[4].split()[7:10] == ["-", "-", "-"]
    assert [line.split()[0] for line in lines[4:]] == ["1", "3"]
    assert all("decode_step_steady_s" not in r for r in rows)


def test_latency_steady_step_from_the_middle_of_longer_runs(tmp_path: Path) -> None:
    report = _run(tmp_path, "bench", "latency", "--batch-sizes", "2", "--input-len", "8",
                  "--output-len", "24", "--num-iters", "1", "--num-iters-warmup", "0")
    (row,) = report["results"]["engine"]
    # 23 decode steps: the steady step is one of them, so it lies below the whole decode.
    assert 0 < row["decode_step_steady_s"] < row["generate_s"] - row["prefill_s"]
    assert row["steady_over_max_floor"] == pytest.approx(
        row["decode_step_steady_s"] / max(row["memory_floor_s"], row["matmul_floor_s"]))


class _FakeEngine:
    def __init__(self) -> None:
        self.calls = 0

    def step(self, final_only: bool = False) -> list[int]:
        self.calls += 1
        return [self.calls] if final_only else []


def test_step_clock_takes_the_median_of_the_middle_half(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _FakeEngine()
    clock = StepClock(engine)
    ticks = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr(bench_latency.time, "perf_counter", lambda: next(ticks))
    assert [engine.step(final_only=True) for _ in range(7)] == [[i] for i in range(1, 8)]
    assert clock.steady_step_s() is None  # six gaps: too few
    # Ramp gaps of 5 s and a tail of 9 s around eight 2 s gaps and one 3 s gap.
    clock.times[:] = [0, 5, 10, 12, 14, 16, 19, 21, 23, 25, 27, 36, 45]
    assert clock.steady_step_s() == 2.0


@pytest.mark.parametrize(("intervals", "union"), [
    ([], 0.0),
    ([(0.0, 2.0), (5.0, 6.0)], 3.0),
    ([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0)], 4.0),  # overlap, out of order
    ([(0.0, 10.0), (2.0, 3.0), (9.0, 12.0)], 12.0),  # nested, then extending
])
def test_gpu_busy_time_is_the_union_of_device_intervals(intervals: list[tuple[float, float]],
                                                         union: float) -> None:
    assert union_seconds(intervals) == union


@pytest.mark.parametrize(("intervals", "gaps"), [
    ([(0.0, 1.0)], []),
    ([(0.0, 2.0), (5.0, 6.0), (6.5, 7.0)], [3.0, 0.5]),
    ([(9.0, 12.0), (0.0, 10.0), (2.0, 3.0), (14.0, 15.0)], [2.0]),  # nested and out of order
    ([(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)], [1.0]),  # touching intervals leave no gap
])
def test_idle_gaps_are_the_holes_in_the_union_longest_first(
        intervals: list[tuple[float, float]], gaps: list[float]) -> None:
    assert idle_gaps(intervals) == gaps
    if intervals:
        window = max(hi for _, hi in intervals) - min(lo for lo, _ in intervals)
        assert union_seconds(intervals) + sum(gaps) == pytest.approx(window)


def test_top_device_ops_ranks_kernels_by_time_per_step() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name: str, start: float, end: float, device=DeviceType.CUDA) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("gemm", 0, 300), event("attn", 300, 350), event("gemm", 400, 700),
              event("memcpy", 700, 710), event("aten::mm", 0, 900, DeviceType.CPU),
              event("empty", 5, 5)]
    ops = top_device_ops(events, steps=2, k=2)
    assert [op["name"] for op in ops] == ["gemm", "attn"]
    assert ops[0]["ms_per_step"] == pytest.approx(0.3)
    assert ops[0]["calls_per_step"] == 1.0
    assert ops[1]["ms_per_step"] == pytest.approx(0.025)


def test_graph_usage_between_two_snapshots() -> None:
    from cacheflow_runtime.model_executor.cuda_graphs import CudaGraphUsage
    from cacheflow_serve.bench_throughput import graph_usage_between

    before = CudaGraphUsage(graph_steps=2, graph_rows=6, padding_rows=2).as_dict()
    after = CudaGraphUsage(graph_steps=12, graph_rows=66, padding_rows=14,
                           eager_decode_steps=1).as_dict()
    assert before["padding_fraction"] == 0.25
    assert graph_usage_between(before, after) == {
        "graph_steps": 10, "graph_rows": 60, "padding_rows": 12, "eager_decode_steps": 1,
        "padding_fraction": 12 / 72}
    assert graph_usage_between(before, before)["padding_fraction"] == 0.0


def test_floors_of_the_7b_shape_match_the_issue_figures() -> None:
    """LLaMA-2-7B in fp16 at 4150 GB/s, 128 + 128 tokens: the floors quoted in issue 10."""
    summary = {"parameters": 6_738_415_616, "parameter_bytes": 2 * 6_738_415_616,
               "kv_bytes_per_token": 2 * 32 * 4096 * 2}
    got = {b: floors(summary, b, 128, 128, 4150e9, 800e12)["memory_floor_s"] * 1e3
           for b in (1, 64, 256)}
    assert got == pytest.approx({1: 3.28, 64: 4.81, 256: 9.46}, abs=0.02)
    assert floors(summary, 256, 128, 128, 4150e9, 800e12)["matmul_floor_s"] == pytest.approx(
        2 * 6_738_415_616 * 256 / 800e12)


def test_length_spec_parsing_and_seeded_draws() -> None:
    assert LengthSpec.parse("128", "--input-len") == LengthSpec(128, 128)
    assert LengthSpec.parse("16:1024", "--input-len") == LengthSpec(16, 1024)
    spec = LengthSpec(2, 5)
    draws = [spec.sample(random.Random(s)) for s in range(50)]
    assert set(draws) == {2, 3, 4, 5}
    a = synthetic_requests(3, spec, spec, [7, 8, 9], seed=1)
    assert a == synthetic_requests(3, spec, spec, [7, 8, 9], seed=1)
    assert a != synthetic_requests(3, spec, spec, [7, 8, 9], seed=2)


@pytest.mark.parametrize("args, message", [
    (["throughput", "--input-len", "0"],
     "cacheflow: error: --input-len must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got '0'"),
    (["throughput", "--input-len", "9:3"],
     "cacheflow: error: --input-len must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got '9:3'"),
    (["throughput", "--output-len", "a:b"],
     "cacheflow: error: --output-len must be N or MIN:MAX (integers), got 'a:b'"),
    (["throughput", "--num-prompts", "0"],
     "cacheflow: error: --num-prompts must be a positive integer, got 0"),
    (["throughput", "--num-prompts", "many"],
     "cacheflow bench throughput: error: argument --num-prompts: invalid int value: 'many'"),
    (["throughput", "--baseline", "vllm"],
     "cacheflow bench throughput: error: argument --baseline: invalid choice: 'vllm'"),
    (["throughput", "--random-weights"],
     "cacheflow: error: --random-weights needs --hf-config NAME_OR_JSON"),
    (["throughput", "--hf-config", "tiny"],
     "cacheflow: error: --hf-config is only used with --random-weights"),
    (["throughput", "--random-weights", "--hf-config", "tiny", "--model", "m"],
     "cacheflow: error: give either --model or --random-weights, not both"),
    (["throughput", "--random-weights", "--hf-config", "huge", "--device", "cpu"],
     "cacheflow: error: --hf-config 'huge' is neither a preset (llama-7b, llama-13b, "
     "tinyllama-1.1b, tiny), a config.json path nor a JSON object"),
    (["throughput", *SMOKE, "--input-len", "500", "--output-len", "20"],
     "cacheflow: error: the longest prompt plus output (520 tokens) is more than max_model_len "
     "(512); lower --input-len / --output-len"),
    (["throughput", "--model", "/no/such/model", "--device", "cpu"],
     "cacheflow: error: model path '/no/such/model' does not exist"),
    (["latency", "--input-len", "8:16"],
     "cacheflow: error: --input-len must be one fixed length for latency, got 8:16"),
    (["latency", "--output-len", "1"],
     "cacheflow: error: --output-len must be at least 2 to time decode steps, got 1"),
    (["latency", "--batch-sizes", "1,0"],
     "cacheflow: error: --batch-sizes must be comma-separated positive integers, got '1,0'"),
    (["latency", "--batch-sizes", "1,,2"],
     "cacheflow: error: --batch-sizes must be comma-separated positive integers, got '1,,2'"),
    (["latency", "--max-num-seqs", "8"],
     "cacheflow: error: --max-num-seqs (8) is below the largest batch size (256): that batch "
     "would not run as one"),
    (["latency", "--output-json", "/no/such/folder/l.json"],
     "cacheflow: error: --output-json: folder '/no/such/folder' does not exist"),
    (["latency", "--output-json", "/"], "cacheflow: error: --output-json: '/' is a folder; "
                                         "give a file path"),
    (["throughput", *SMOKE, "--step-trace", "/no/such/folder/t.json"],
     "cacheflow: error: --step-trace: folder '/no/such/folder' does not exist"),
    (["prefix-caching", *SMOKE, "--baseline", "hf"],
     "cacheflow: error: bench prefix-caching compares the engine with its prefix cache off and "
     "on; --baseline hf is for bench throughput / latency"),
    (["prefix-caching", *SMOKE, "--no-enable-prefix-caching"],
     "cacheflow: error: bench prefix-caching runs with the prefix cache off, then on; leave out "
     "--enable-prefix-caching / --no-enable-prefix-caching"),
    (["latency", "--gpu-busy-steps", "-1"],
     "cacheflow: error: --gpu-busy-steps must be >= 0, got -1"),
    (["latency", "--gpu-memory-utilization", "1.5"],
     "cacheflow: error: --gpu-memory-utilization must be in (0, 1], got 1.5"),
])
def test_bad_options_are_one_line_errors(args: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = main(["bench", *args])
    except SystemExit as exc:  # argparse's own errors (through OneLineErrorParser)
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_gpu_busy_without_cuda_is_a_clear_error(tiny_path: Path) -> None:
    llm = LLM(str(tiny_path), device="cpu", kv_cache_blocks=128)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        measure_gpu_busy(llm.engine, [[5, 6, 7]], steps=4)
    assert_idle(llm)


def test_latency_sweep_warms_the_engine_before_timing_even_without_warmup_runs() -> None:
    calls: list[tuple[int, int]] = []

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        calls.append((len(prompts), max_tokens))
        return [max_tokens] * len(prompts)

    runner = bench_latency._Runner(generate, [1, 2, 3], 4, 0, torch.device("cpu"))
    args = argparse.Namespace(num_iters=1, num_iters_warmup=0, disable_tqdm=True)
    rows = bench_latency._sweep(runner, [3, 5], 6, args, "engine")
    # One untimed 2-token call on one prompt first; then per batch size the 1-token and the
    # N-token timed calls, no per-size warmup.
    assert calls == [(1, 2), (3, 1), (3, 6), (5, 1), (5, 6)]
    assert [r["batch_size"] for r in rows] == [3, 5]
