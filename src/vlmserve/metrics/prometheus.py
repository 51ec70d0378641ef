"""Prometheus exposition of the stats in metrics/stats.py: the only module that imports prometheus_client.

NIM's metric names (vLLM's without the `vllm:` prefix) and ours for images. Two paths in:
- pushed: `record_request(RequestStats)`, called on the event loop as each engine request ends
  (counters and histograms of tokens, latencies and finish reasons);
- pulled at scrape time from the model server (`attach`): the engine's EngineStats snapshot (gauges
  after the latest step, counters since the start, the vision encoder's included) and the
  preprocessor's totals.
Each exporter has its own registry, so several apps (tests) never share metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vlmserve.metrics.stats import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets, so dashboards built for NIM/vLLM read ours the same way
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# a request that ended with one of these reasons succeeded
_SUCCESS_REASONS = frozenset({"stop", "length"})


class MetricsExporter:
    """Owns a registry with every metric; `render()` is the body of GET /v1/metrics."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_server: Any = None
        labels = ["model_name"]
        self._label = model_name
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens processed (images included).", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "request_success",
            "Requests that finished normally, by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.request_finish = Counter(
            "request_finish",
            "Requests that ended, by finish reason (stop, length, abort, error).",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Seconds from arrival at the engine to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Mean seconds between generated tokens after the first, per request.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "e2e_request_latency_seconds",
            "Seconds from arrival at the engine to the end of the request.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_prompt_tokens = Histogram(
            "request_prompt_tokens",
            "Prompt tokens per request.",
            labels,
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.request_generation_tokens = Histogram(
            "request_generation_tokens",
            "Generated tokens per request.",
            labels,
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ModelServerCollector(self))

    def attach(self, model_server: Any, model_name: str) -> None:
        """Read the engine's and the preprocessor's stats from `model_server` at each scrape, and take
        request timings from its engine."""
        self._model_server = model_server
        self._label = model_name
        model_server.engine.request_stats_sink = self.record_request

    def record_request(self, stats: RequestStats) -> None:
        label = self._label
        self.prompt_tokens.labels(label).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(label).inc(stats.num_generation_tokens)
        self.request_finish.labels(label, stats.finish_reason).inc()
        if stats.finish_reason in _SUCCESS_REASONS:
            self.request_success.labels(label, stats.finish_reason).inc()
            self.request_prompt_tokens.labels(label).observe(stats.num_prompt_tokens)
            self.request_generation_tokens.labels(label).observe(stats.num_generation_tokens)
            self.e2e_latency.labels(label).observe(stats.e2e_latency)
        if stats.time_to_first_token is not None:
            self.ttft.labels(label).observe(stats.time_to_first_token)
        if stats.time_per_output_token is not None:
            self.tpot.labels(label).observe(stats.time_per_output_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelServerCollector(Collector):
    """The pulled metrics: read from the attached model server at each scrape (zeros before the load)."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def describe(self) -> list[Metric]:
        return []  # the families are built per scrape; nothing to check for clashes up front

    def collect(self) -> Iterator[Metric]:
        server = self._exporter._model_server
        label = [self._exporter._label]
        engine = getattr(server, "engine", None)
        stats = _call(engine, "stats")  # one EngineStats snapshot: gauges and totals of the same step
        preprocessor = getattr(server, "preprocessor", None)
        images = getattr(preprocessor, "stats", None)
        image_cache = getattr(preprocessor, "image_cache", None)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", _get(stats, "num_running"))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", _get(stats, "num_waiting"))
        yield gauge(
            "gpu_cache_usage_perc",
            "Fraction (0 to 1) of KV cache blocks held by requests (the KV cache on CPU too).",
            _get(stats, "kv_cache_usage"),
        )
        queries, hits = _get(stats, "prefix_cache_queries"), _get(stats, "prefix_cache_hits")
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield gauge(
            "gpu_prefix_cache_hit_rate",
            "Prefix-cache hits / queries in tokens, since start.",
            hits / queries if queries else 0.0,
        )
        yield counter(
            "num_preemptions",
            "Running requests preempted (KV freed, recomputed later).",
            _get(stats, "num_preemptions"),
        )
        yield counter(
            "images_processed",
            "Images loaded for requests: fetched or decoded and tiled, or from the processed-image cache.",
            _get(images, "num_images"),
        )
        yield counter(
            "image_preprocessing_seconds",
            "Seconds spent loading (fetch, decode) and tiling images, summed over images.",
            _get(images, "preprocess_seconds"),
        )
        yield counter(
            "image_input_cache_hits",
            "Images taken already decoded and tiled from the front end's processed-image cache.",
            _get(image_cache, "hits"),
        )
        yield counter(
            "image_input_cache_misses",
            "Images decoded and tiled because the processed-image cache did not hold them.",
            _get(image_cache, "misses"),
        )
        yield counter(
            "vision_encoder_images",
            "Images run through the vision encoder.",
            _get(stats, "encoder_cache_misses"),
        )
        yield counter(
            "vision_encoder_seconds",
            "Seconds spent in the vision encoder.",
            _get(stats, "vision_encoder_seconds"),
        )
        yield counter(
            "image_embedding_cache_hits",
            "Images the vision encoder was skipped for: features from the encoder cache, or KV from "
            "the prefix cache.",
            _get(stats, "encoder_cache_hits") + _get(stats, "num_images_cached"),
        )
        yield counter(
            "image_embedding_cache_misses",
            "Images the vision encoder had to run on.",
            _get(stats, "encoder_cache_misses"),
        )
        yield gauge(
            "image_embedding_cache_bytes",
            "Bytes of image features held in the encoder cache.",
            _get(stats, "encoder_cache_bytes"),
        )


def _call(obj: Any, method: str) -> Any:
    function = getattr(obj, method, None)
    return function() if callable(function) else None


def _get(stats: Any, name: str) -> float:
    return float(getattr(stats, name, 0) or 0)
