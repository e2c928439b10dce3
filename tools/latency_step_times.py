"""Per-step wall times of `cacheflow bench latency`'s N-token run at one batch size.

    python3 tools/latency_step_times.py CKPT --batch 64 [--input-len 128 --output-len 128]

Runs the same generate calls as the benchmark (fresh prompts, greedy, ignore_eos; one warm-up
call), records when each engine step returns, and prints the time to the first step, the first
and last steps' intervals, the steady median and how the whole run's decode-step figure
((t(N) - t(1)) / (N - 1)) splits into steps and the rest of the call: where the whole-run
excess over the steady step comes from.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt", type=Path)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--disable-detokenize", action="store_true")
    args = p.parse_args()
    import torch

    from cacheflow_runtime import SamplingParams
    from cacheflow_serve import LLM
    from cacheflow_serve.bench_latency import StepClock

    llm = LLM(model=str(args.ckpt), dtype="float16")
    clock = StepClock(llm.engine)
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size

    def run(max_tokens: int) -> tuple[float, list[float], float, float]:
        prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.input_len)]}
                   for _ in range(args.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=not args.disable_detokenize)
        torch.cuda.synchronize()
        clock.times.clear()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        end = time.perf_counter()
        return start, list(clock.times), end, clock.steady_step_s()  # the benchmark's steady step

    run(args.output_len)  # warm-up
    s1, _, e1, _ = run(1)
    start, times, end, steady = run(args.output_len)
    t1, tn = e1 - s1, end - start
    gaps = [b - a for a, b in zip(times, times[1:])]
    n = args.output_len
    print(f"{torch.cuda.get_device_name()} batch {args.batch}: t(1) {t1 * 1e3:.1f} ms, "
          f"t(N) {tn * 1e3:.1f} ms, {len(times)} steps")
    print(f"  whole-run step {(tn - t1) / (n - 1) * 1e3:.3f} ms, steady {steady * 1e3:.3f} ms")
    print(f"  call start -> first step returns {(times[0] - start) * 1e3:.1f} ms; last step "
          f"-> call returns {(end - times[-1]) * 1e3:.1f} ms")
    print("  first 12 intervals ms: " + " ".join(f"{g * 1e3:.2f}" for g in gaps[:12]))
    print("  last 8 intervals ms:   " + " ".join(f"{g * 1e3:.2f}" for g in gaps[-8:]))
    excess = (tn - t1) - (n - 1) * steady
    over = sum(g - steady for g in gaps if g > 1.5 * steady)
    print(f"  excess over (N-1) x steady: {excess * 1e3:.1f} ms; intervals > 1.5x steady add "
          f"{over * 1e3:.1f} ms; steps beyond N: {len(times) - n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
