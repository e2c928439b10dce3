"""Offline generation throughput of the engine on one GPU, next to HF transformers' ``generate``.

    python packages/cacheflow-serve/benchmarks/bench_offline.py --out offline.json
    python .../bench_offline.py --out o.json --layers 22 --hidden 2048 --batch 128

A random-weight LLaMA checkpoint of the given shape (default: TinyLlama-1.1B's: 22 layers,
hidden 2048, 32 query / 4 KV heads of 64, MLP 5632, vocabulary of 259 byte tokens) is written to
a temporary folder; no download. ``--batch`` prompts of ``--prompt-len`` random tokens each
generate ``--max-tokens`` tokens (greedy, no early stop) through ``LLM.generate``, timed end to
end after a warm-up batch: generated tokens per second and the mean time per engine step. Runs:

- ``engine``: the engine as shipped (attention, norms, rotary, activations and cache moves on the
  kernels of cacheflow-kernels; decode steps replayed from CUDA graphs);
- ``eager``: the same with ``enforce_eager=True`` (every step launched from Python);
- ``torch-layers``: eager, and the layers' torch code (norm, rotary, activations); attention
  still on the kernels. Against ``eager`` it shows what the fused layers are worth;
- ``hf``: HF transformers ``generate`` on the same prompts as one left-padded batch (SDPA
  attention, static KV cache growth by concatenation), same dtype.

Prints a table and writes JSON. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--batch", type=int, default=64, help="prompts per timed batch")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed batches per run (median)")
    p.add_argument("--runs", default="engine,eager,torch-layers,hf",
                   help="comma-separated: engine, eager, torch-layers, hf")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script)")
    return p.parse_args(argv)


def write_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """A random LLaMA of the requested shape, saved in ``args.dtype`` with the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cacheflow_models.testing import byte_tokenizer

    config = LlamaConfig(
        vocab_size=259, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    path = folder / "llama"
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_prompts(args: argparse.Namespace, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (args.batch, args.prompt_len), generator=gen).tolist()


def run_engine(args: argparse.Namespace, path: Path, torch_layers: bool,
               enforce_eager: bool) -> dict[str, Any]:
    """Tokens per second of LLM.generate; ``torch_layers`` switches the layer kernels off."""
    import torch

    from cacheflow_runtime.layers import activation, layernorm, rotary_embedding
    from cacheflow_serve import LLM

    saved = {m: m.kernels_for for m in (activation, layernorm, rotary_embedding)}
    if torch_layers:
        for module in saved:
            module.kernels_for = lambda *tensors: None
    try:
        llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=max(256, args.batch),
                  max_model_len=args.prompt_len + args.max_tokens + 16,
                  enforce_eager=enforce_eager)
        stats = _timed_generate(args, llm)
        del llm  # the next run needs the KV cache's memory back
        gc.collect()
        return stats
    finally:
        for module, fn in saved.items():
            module.kernels_for = fn
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _timed_generate(args: argparse.Namespace, llm: Any) -> dict[str, Any]:
    """Median of ``args.repeats`` timed LLM.generate batches after a warm-up batch."""
    from cacheflow_runtime import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    warm = [{"prompt_token_ids": p} for p in make_prompts(args, 99)[:8]]
    llm.generate(warm, params, use_tqdm=False)  # warm-up: kernels load, caches allocate
    engine = llm.engine
    original_step = engine.step
    count = [0]

    def counted_step() -> Any:
        count[0] += 1
        return original_step()

    times, steps = [], []
    engine.step = counted_step  # type: ignore[method-assign]
    try:
        for r in range(args.repeats):
            prompts = [{"prompt_token_ids": p} for p in make_prompts(args, r)]
            count[0] = 0
            sync(args.device)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            sync(args.device)
            times.append(time.perf_counter() - start)
            steps.append(count[0])
            assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outputs)
    finally:
        engine.step = original_step  # type: ignore[method-assign]
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_s": args.batch * args.max_tokens / seconds,
            "steps": steps[0], "ms_per_step": 1000 * seconds / steps[0],
            "device_blocks": engine.worker.cache_engine.num_device_blocks}


def run_hf(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Tokens per second of HF generate on one left-padded batch (all prompts equal length)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(args.device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def generate(prompts: list[list[int]]) -> Any:
        ids = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)

    generate(make_prompts(args, 99)[:8])
    times = []
    for r in range(args.repeats):
        prompts = make_prompts(args, r)
        sync(args.device)
        start = time.perf_counter()
        out = generate(prompts)
        sync(args.device)
        times.append(time.perf_counter() - start)
        assert out.shape[1] == args.prompt_len + args.max_tokens
    seconds = statistics.median(times)
    model = None  # free the weights before the next run
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens_per_s": args.batch * args.max_tokens / seconds,
            "steps": args.max_tokens, "ms_per_step": 1000 * seconds / args.max_tokens}


def main(argv: list[str] | None = None) -> int:
    """Runs the requested runs; exit status 1 without a CUDA device."""
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_offline: no CUDA device; nothing measured", file=sys.stderr)
        return 1
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - {"engine", "eager", "torch-layers", "hf"})
    if unknown:
        print(f"bench_offline: unknown runs {unknown}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(args, Path(tmp))
        for run in tqdm(runs, desc="runs"):
            if run == "hf":
                results[run] = run_hf(args, path)
            else:
                results[run] = run_engine(args, path, torch_layers=run == "torch-layers",
                                          enforce_eager=run != "engine")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\n{device}, {args.dtype}: LLaMA {args.layers} layers, hidden {args.hidden}, "
          f"heads {args.heads}/{args.kv_heads}; {args.batch} prompts x {args.prompt_len} tokens "
          f"-> {args.max_tokens} new tokens each")
    print(f"{'run':<14} {'seconds':>8} {'tokens/s':>10} {'steps':>6} {'ms/step':>8}")
    for run, r in results.items():
        print(f"{run:<14} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} {r['steps']:6d} "
              f"{r['ms_per_step']:8.2f}")
    for faster, slower, what in (("eager", "torch-layers", "fused layers (eager)"),
                                 ("engine", "eager", "CUDA graphs"),
                                 ("engine", "hf", "engine against HF generate")):
        if faster in results and slower in results:
            ratio = results[slower]["seconds"] / results[faster]["seconds"]
            print(f"{what}: {ratio:.2f}x the speed")
    report = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
              "args": vars(args), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
