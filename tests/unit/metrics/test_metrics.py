"""Metrics: the engine measures (RequestStats, totals), prometheus.py exposes; checked end to end over
the real Scheduler with a fake runner, and the exporter on its own."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.engine.test_engine import FakeRunner, make_engine, request
from vlmserve.metrics.prometheus import MetricsExporter
from vlmserve.metrics.stats import ImageStats, RequestStats

NIM_NAMES = {
    "num_requests_running",
    "num_requests_waiting",
    "gpu_cache_usage_perc",
    "prompt_tokens",
    "generation_tokens",
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "e2e_request_latency_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_success",
    "request_finish",
    "images_processed",
    "image_preprocessing_seconds",
    "vision_encoder_seconds",
    "image_embedding_cache_hits",
    "image_embedding_cache_misses",
    "image_input_cache_hits",
    "image_input_cache_misses",
    "gpu_prefix_cache_hit_rate",
}


def samples(exporter: MetricsExporter) -> dict[str, float]:
    """{name{labels}: value} of every sample, labels other than model_name kept in the key."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exporter.render().decode()):
        for sample in family.samples:
            extra = {k: v for k, v in sample.labels.items() if k != "model_name"}
            key = sample.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}" if extra else ""
            )
            out[key] = sample.value
    return out


def test_every_contract_metric_is_exposed_before_the_load() -> None:
    names = {family.name for family in text_string_to_metric_families(MetricsExporter().render().decode())}
    assert names >= NIM_NAMES, NIM_NAMES - names


def test_request_stats_fill_counters_and_histograms() -> None:
    exporter = MetricsExporter("m")
    exporter.record_request(RequestStats("a", "stop", 10, 5, 100.0, 100.5, 101.0))
    exporter.record_request(RequestStats("b", "abort", 7, 0, 100.0, None, 100.2))
    values = samples(exporter)
    assert values["prompt_tokens_total"] == 17 and values["generation_tokens_total"] == 5
    assert values["request_success_total{finished_reason=stop}"] == 1
    assert values["request_finish_total{finished_reason=abort}"] == 1
    assert "request_success_total{finished_reason=abort}" not in values
    assert values["time_to_first_token_seconds_sum"] == pytest.approx(0.5)
    assert values["time_per_output_token_seconds_sum"] == pytest.approx(0.125)
    assert values["e2e_request_latency_seconds_count"] == 1


class _Server:
    def __init__(self, engine: object) -> None:
        self.engine = engine
        image_cache = type("C", (), {"hits": 3, "misses": 2})()
        self.preprocessor = type("P", (), {"stats": ImageStats(), "image_cache": image_cache})()


async def test_engine_requests_are_measured() -> None:
    engine = make_engine(FakeRunner(b"hi"))
    exporter = MetricsExporter()
    server = _Server(engine)
    server.preprocessor.stats.add(0.25)
    exporter.attach(server, "m")
    try:
        outputs = [o async for o in engine.generate(request("r1", max_tokens=10))]
        assert outputs[-1].finish_reason is not None
        generator = engine.generate(request("r2", max_tokens=10))
        await anext(generator)
        await generator.aclose()  # the consumer goes away: an abort
        for _ in range(100):
            if engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        values = samples(exporter)
    finally:
        await engine.aclose()
    assert values["request_success_total{finished_reason=stop}"] == 1
    assert values["request_finish_total{finished_reason=abort}"] == 1
    assert values["generation_tokens_total"] == 4  # "h", "i", EOS, and r2's first token
    assert values["prompt_tokens_total"] == 6
    assert values["gpu_cache_usage_perc"] == 0 and values["num_requests_running"] == 0
    assert values["prefix_cache_queries_total"] > 0
    assert values["images_processed_total"] == 1 and values["image_preprocessing_seconds_total"] == 0.25
    assert values["image_input_cache_hits_total"] == 3 and values["image_input_cache_misses_total"] == 2
