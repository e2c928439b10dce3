"""Prometheus metrics of one app, in its own CollectorRegistry (so several apps can coexist).

Engine state (requests running / waiting / swapped, KV-cache blocks and usage, token counters)
is read from the async engine's latest snapshot at scrape time; time-to-first-token and
inter-token latency are histograms fed by the async engine as it makes outputs.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cacheflow_runtime import BaseAsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: BaseAsyncEngine, model: str) -> None:
        self._engine = engine
        self._model = model

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._model], value)
            return c

        yield gauge("cacheflow_num_requests_running", "Requests running on the device.",
                    s.num_running)
        yield gauge("cacheflow_num_requests_waiting", "Requests waiting to be scheduled.",
                    s.num_waiting)
        yield gauge("cacheflow_num_requests_swapped", "Requests swapped out to host memory.",
                    s.num_swapped)
        yield gauge("cacheflow_num_requests_in_flight",
                    "Requests added through the server and not finished or aborted.",
                    self._engine.num_in_flight)
        yield gauge("cacheflow_gpu_cache_usage_perc", "Fraction of device KV blocks in use.",
                    s.gpu_cache_usage)
        yield gauge("cacheflow_cpu_cache_usage_perc", "Fraction of host KV blocks in use.",
                    s.cpu_cache_usage)
        for device, free, total in (("gpu", s.num_free_gpu_blocks, s.num_total_gpu_blocks),
                                    ("cpu", s.num_free_cpu_blocks, s.num_total_cpu_blocks)):
            yield gauge(f"cacheflow_{device}_kv_blocks_free", f"Free {device} KV blocks.", free)
            yield gauge(f"cacheflow_{device}_kv_blocks_total", f"All {device} KV blocks.", total)
        yield counter("cacheflow_prompt_tokens",
                      "Prompt tokens of requests that produced a token (each prompt once).",
                      s.num_prompt_tokens)
        yield counter("cacheflow_generation_tokens", "Tokens generated.",
                      s.num_generation_tokens)
        yield counter("cacheflow_num_preemptions", "Preemptions of running requests.",
                      s.num_preemptions)
        yield counter("cacheflow_prefix_cache_queries",
                      "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("cacheflow_prefix_cache_hits",
                      "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("cacheflow_num_requests_abandoned",
                      "Requests aborted because the client went away.",
                      self._engine.num_abandoned)


class ServerMetrics:
    """The app's registry and the histograms the async engine feeds (a RequestObserver)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.ttft = Histogram("cacheflow_time_to_first_token_seconds",
                              "Seconds from request arrival to its first token.",
                              ["model_name"], buckets=_TTFT_BUCKETS,
                              registry=self.registry).labels(model)
        self.itl = Histogram("cacheflow_inter_token_latency_seconds",
                             "Seconds between two tokens of one request.", ["model_name"],
                             buckets=_ITL_BUCKETS, registry=self.registry).labels(model)
        self.finished = Counter("cacheflow_request_success",
                                "Finished choices by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)

    def watch_engine(self, engine: BaseAsyncEngine) -> None:
        """Exports the engine's state, read from its latest snapshot at each scrape."""
        self.registry.register(_EngineCollector(engine, self.model))

    def observe_time_to_first_token(self, seconds: float) -> None:
        """RequestObserver: one request's time to first token."""
        self.ttft.observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        """RequestObserver: the gap between two tokens of one request."""
        self.itl.observe(seconds)

    def count_finished(self, reason: str | None) -> None:
        """Counts one finished choice."""
        self.finished.labels(self.model, reason or "unknown").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)
