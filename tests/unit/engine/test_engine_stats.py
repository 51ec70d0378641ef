"""EngineStats (cumulative counters and gauges in one snapshot) and RequestStats per ended request,
over the real Scheduler with the fake runner of test_engine."""

import asyncio
import dataclasses
import threading

import pytest

from tests.unit.engine.test_engine import FakeRunner, collect, make_engine, request
from vlmserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vlmserve.errors import RequestFailedError
from vlmserve.metrics.stats import EncoderStats, EngineStats, RequestStats
from vlmserve.protocol.types import EngineRequest, SamplingParams

NUM_TOKENS = len("hello world") + 1  # the script, then EOS


class EncodingRunner(FakeRunner):
    """Reports one encoder-cache miss (0.25 s) and one hit in every step that starts a request."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = super().execute(scheduler_output)
        if not scheduler_output.scheduled_new_requests:
            return output
        stats = EncoderStats(num_cache_hits=1, num_cache_misses=1, encoder_seconds=0.25, cache_bytes=4096)
        return dataclasses.replace(output, encoder_stats=stats)


async def test_counters_add_up_over_steps_and_snapshots_stay_put() -> None:
    engine = make_engine(EncodingRunner())
    try:
        await collect(engine, request("a"))
        after_first = engine.stats()
        prompt = list(range(1, 10))  # 9 tokens: two full blocks of 4 to share
        await collect(engine, EngineRequest("b", prompt, SamplingParams(temperature=0.0)))
        await collect(engine, EngineRequest("c", prompt, SamplingParams(temperature=0.0)))
        stats = engine.stats()
    finally:
        await engine.aclose()
    assert after_first.num_generation_tokens == NUM_TOKENS and after_first.num_prompt_tokens == 3
    assert stats.num_generation_tokens == 3 * NUM_TOKENS
    assert stats.num_prompt_tokens == 3 + 9 + 9
    assert stats.prefix_cache_queries == 3 + 9 + 9
    assert stats.prefix_cache_hits == 8  # c found b's two full blocks
    assert (stats.encoder_cache_hits, stats.encoder_cache_misses) == (3, 3)
    assert stats.vision_encoder_seconds == pytest.approx(0.75)
    assert stats.encoder_cache_bytes == 4096
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.num_preemptions == 0
    assert after_first.num_generation_tokens == NUM_TOKENS  # an old snapshot never changes


async def test_a_poller_on_another_thread_sees_monotonic_consistent_snapshots() -> None:
    engine = make_engine(FakeRunner(b"x" * 40), max_model_len=60)
    seen: list[EngineStats] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(engine.stats())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        await asyncio.gather(*(collect(engine, request(f"r{i}", max_tokens=30)) for i in range(6)))
    finally:
        done.set()
        poller.join()
        await engine.aclose()
    tokens = [s.num_generation_tokens for s in seen]
    assert tokens == sorted(tokens)
    assert engine.stats().num_generation_tokens == 6 * 30
    assert all(isinstance(s, EngineStats) for s in seen)


async def test_request_stats_reach_the_sink_for_every_ending() -> None:
    runner = FakeRunner(b"x" * 50)
    runner.fail_ids.add("failed")
    ended: list[RequestStats] = []
    engine = make_engine(runner, max_model_len=60)
    engine.request_stats_sink = ended.append
    try:
        await collect(engine, request("stopped", max_tokens=100))
        await collect(engine, request("length", max_tokens=5))
        agen = engine.generate(request("aborted", max_tokens=40))
        await anext(agen)
        await agen.aclose()  # the client went away
        with pytest.raises(RequestFailedError):
            await collect(engine, request("failed"))
    finally:
        await engine.aclose()
    by_id = {stats.request_id: stats for stats in ended}
    assert len(ended) == 4
    assert {rid: s.finish_reason for rid, s in by_id.items()} == {
        "stopped": "stop",
        "length": "length",
        "aborted": "abort",
        "failed": "error",
    }
    assert by_id["stopped"].num_generation_tokens == 51  # 50 bytes, then EOS
    assert by_id["length"].num_generation_tokens == 5
    assert by_id["aborted"].num_generation_tokens == 1
    assert by_id["failed"].num_generation_tokens == 0 and by_id["failed"].first_token_time is None
    for stats in ended:
        assert stats.num_prompt_tokens == 3
        assert stats.arrival_time <= (stats.first_token_time or stats.arrival_time) <= stats.finish_time
    assert by_id["stopped"].time_per_output_token is not None


async def test_a_failing_sink_does_not_fail_the_request() -> None:
    def sink(stats: RequestStats) -> None:
        raise RuntimeError("exporter bug")

    engine = make_engine(FakeRunner(), max_model_len=64)
    engine.request_stats_sink = sink
    try:
        text, _ = await collect(engine, request("a"))
    finally:
        await engine.aclose()
    assert text == "hello world"
