"""``cacheflow bench serve``: replay a request set against a running server and report latency.

Requests go to ``/v1/completions`` (or ``/v1/chat/completions``), streamed, at a Poisson rate
(``--request-rate``; ``inf`` sends them all at once), optionally capped at
``--max-concurrency`` in flight. Reported: request and output-token throughput, and p50 / p90 /
p99 of time to first token (TTFT), time per output token after the first (TPOT) and the gap
between streamed chunks (ITL). A table goes to stdout, everything to ``--output-json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PERCENTILES = (50, 90, 99)
_WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers watch "
          "paged attention schedule every token of the batch in small blocks").split()


@dataclass
class BenchRequest:
    """One request to replay."""

    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    """What one request measured (seconds)."""

    ok: bool
    latency: float = 0.0
    ttft: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: Optional[str] = None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cacheflow bench serve``."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="JSONL of {\"prompt\": ..., \"max_tokens\": ...} (default: synthetic)")
    parser.add_argument("--num-prompts", type=int, default=100,
                        help="requests to send (default: %(default)s)")
    parser.add_argument("--input-len", default="32",
                        help="synthetic prompt length: N, or MIN:MAX drawn uniformly per request "
                             "(words; tokens with --random-prompt-tokens)")
    parser.add_argument("--output-len", default="32",
                        help="max_tokens per request: N, or MIN:MAX drawn uniformly")
    parser.add_argument("--random-prompt-tokens", default=None, metavar="LO:HI",
                        help="synthetic prompts as token ids drawn uniformly from [LO, HI) "
                             "(completions endpoint only), so --input-len counts tokens")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly max_tokens (cacheflow's ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None,
                        help="the server's API key (default: $CACHEFLOW_API_KEY, else "
                             "$OPENAI_API_KEY, else none)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--output-json", type=Path, default=None)


def load_requests(dataset: Optional[Path], num_prompts: int, input_len: str, output_len: str,
                  seed: int, token_range: Optional[str] = None) -> list[BenchRequest]:
    """The request set: the first ``num_prompts`` of a JSONL file, or synthetic prompts (words,
    or token ids drawn from ``token_range`` "LO:HI") of the lengths the specs give."""
    from cacheflow_serve.bench_common import LengthSpec

    n_in = LengthSpec.parse(input_len, "--input-len")
    n_out = LengthSpec.parse(output_len, "--output-len")
    rng = random.Random(seed)
    if dataset is not None:
        requests = []
        with open(dataset, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(requests) == num_prompts:
                    break
                if line.strip():
                    requests.append(_dataset_request(line, f"{dataset}:{number}",
                                                     lambda: n_out.sample(rng)))
        return requests
    if token_range is not None:
        lo, _, hi = token_range.partition(":")
        try:
            low, high = int(lo), int(hi)
        except ValueError:
            raise ValueError(f"--random-prompt-tokens must be LO:HI, got {token_range!r}") from None
        if not 0 <= low < high:
            raise ValueError(f"--random-prompt-tokens needs 0 <= LO < HI, got {token_range!r}")
        return [BenchRequest([rng.randrange(low, high) for _ in range(n_in.sample(rng))],
                             n_out.sample(rng)) for _ in range(num_prompts)]
    return [BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(n_in.sample(rng))),
                         n_out.sample(rng)) for _ in range(num_prompts)]


def _dataset_request(line: str, where: str, default_max_tokens: Any) -> BenchRequest:
    """One JSONL line as a request: ``{"prompt": text or token ids, "max_tokens": N}``
    (``max_tokens`` optional: ``default_max_tokens()``); ValueError naming ``where``."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: not a JSON object: {exc}") from None
    if not isinstance(item, dict) or "prompt" not in item:
        raise ValueError(f"{where}: each line must be a JSON object with \"prompt\"")
    prompt = item["prompt"]
    is_ids = isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string or list of token "
                         f"ids, got {prompt!r:.60}")
    max_tokens = item.get("max_tokens")
    if max_tokens is None:
        return BenchRequest(prompt, default_max_tokens())
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{where}: \"max_tokens\" must be a positive integer, got "
                         f"{max_tokens!r}")
    return BenchRequest(prompt, max_tokens)


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``count`` Poisson arrivals at ``rate`` per second
    (all zero for an infinite rate)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _stats(values: list[float]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {
        "mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughput and latency percentiles of a run."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done
            if r.ttft is not None and r.output_tokens > 1]
    return {
        "num_requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_token_throughput": output_tokens / duration if duration > 0 else None,
        "prompt_tokens": sum(r.prompt_tokens for r in done), "output_tokens": output_tokens,
        "ttft_s": _stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": _stats(tpot),
        "itl_s": _stats([gap for r in done for gap in r.itl]),
        "e2e_latency_s": _stats([r.latency for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table (latencies in ms)."""
    def num(value: Optional[float], scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.2f}"

    lines = [f"{'requests completed / failed':<32}{summary['completed']} / {summary['failed']}",
             f"{'duration (s)':<32}{num(summary['duration_s'])}",
             f"{'request throughput (req/s)':<32}{num(summary['request_throughput'])}",
             f"{'output throughput (tok/s)':<32}{num(summary['output_token_throughput'])}",
             f"{'metric (ms)':<16}{'mean':>10}" + "".join(f"{f'p{q}':>10}" for q in PERCENTILES)]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                       ("e2e_latency_s", "E2E latency")):
        row = summary[key]
        lines.append(f"{label:<16}{num(row['mean'], 1e3):>10}"
                     + "".join(f"{num(row[f'p{q}'], 1e3):>10}" for q in PERCENTILES))
    errors = summary.get("errors") or []
    if errors:
        lines.append(f"failures ({len(errors)} kinds): {errors[0][:200]}")
    return "\n".join(lines)


def _payload(endpoint: str, model: str, req: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def send_request(session: Any, url: str, payload: dict[str, Any],
                       headers: dict[str, str]) -> RequestResult:
    """Streams one request and measures it."""
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last: Optional[float] = None
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    continue
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if _chunk_text(chunk):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


async def run_benchmark(base_url: str, model: Optional[str], requests: list[BenchRequest], *,
                        endpoint: str = "completions", request_rate: float = math.inf,
                        max_concurrency: Optional[int] = None, api_key: Optional[str] = None,
                        ignore_eos: bool = False, seed: int = 0,
                        timeout: float = 600.0) -> dict[str, Any]:
    """Replays ``requests`` against the server at ``base_url`` and returns the summary."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=client_timeout, connector=connector) as session:
        if model is None:
            async with session.get(base_url + "/v1/models", headers=headers) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:200].replace("\n", " ")
                    raise ValueError(f"{base_url}/v1/models answered {resp.status}: {body} "
                                     f"(wrong --base-url or --api-key?)")
                listed = (await resp.json()).get("data") or []
                if not listed:
                    raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
                model = listed[0]["id"]
        assert model is not None
        start = time.perf_counter()

        async def one(offset: float, req: BenchRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            payload = _payload(endpoint, model, req, ignore_eos)
            if limit is None:
                return await send_request(session, base_url + path, payload, headers)
            async with limit:
                return await send_request(session, base_url + path, payload, headers)

        offsets = arrival_offsets(len(requests), request_rate, seed)
        results = await asyncio.gather(*(one(o, r) for o, r in zip(offsets, requests)))
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration)
    summary.update({"model": model, "endpoint": endpoint, "base_url": base_url,
                    "request_rate": None if math.isinf(request_rate) else request_rate,
                    "max_concurrency": max_concurrency})
    return summary


def server_root(base_url: str) -> str:
    """The server's root URL from ``--base-url``, given with or without the OpenAI ``/v1``
    suffix (``cacheflow chat --url`` and OpenAI clients take it with)."""
    return base_url.rstrip("/").removesuffix("/v1")


def run_bench(args: argparse.Namespace) -> int:
    """Runs ``cacheflow bench serve``; prints the table, writes JSON if asked."""
    from cacheflow_serve.bench_common import check_output_path, positive_int
    from cacheflow_serve.client_cli import api_key

    if args.random_prompt_tokens is not None and args.endpoint != "completions":
        raise ValueError("--random-prompt-tokens needs --endpoint completions")
    positive_int("--num-prompts", args.num_prompts)
    positive_int("--max-concurrency", args.max_concurrency)
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be a number > 0 (inf: all at once), got "
                         f"{args.request_rate}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    requests = load_requests(args.dataset, args.num_prompts, args.input_len, args.output_len,
                             args.seed, args.random_prompt_tokens)
    if not requests:
        raise ValueError("the request set is empty")
    if args.endpoint == "chat" and any(isinstance(r.prompt, list) for r in requests):
        raise ValueError("token-id prompts need --endpoint completions")
    check_output_path("--output-json", args.output_json)
    summary = asyncio.run(run_benchmark(
        server_root(args.base_url), args.model, requests, endpoint=args.endpoint,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency,
        api_key=api_key(args.api_key), ignore_eos=args.ignore_eos, seed=args.seed,
        timeout=args.timeout))
    print(format_table(summary))
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0 if summary["completed"] else 1
