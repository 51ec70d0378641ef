"""EngineCore and AsyncEngine over the real Scheduler, driven by a fake model runner (no weights)."""

import asyncio
import threading

import pytest

from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.kv_cache import KVCacheManager
from vlmserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig
from vlmserve.errors import EngineDeadError, RequestFailedError, ServerBusyError
from vlmserve.protocol.types import EngineRequest, FinishReason, SamplingParams

EOS = 0
NUM_BLOCKS = 64


class FakeRunner:
    """Emits the bytes of a script, then EOS, for every request; can be told to fail or to block.

    Keeps per-request state only from SchedulerOutputs, as the real runner must: [num_tokens, num_output].
    """

    def __init__(self, script=b"hello world"):
        self.script = script
        self.fail_ids: set[str] = set()
        self.states: dict[str, list[int]] = {}
        self.gate = threading.Event()
        self.gate.set()

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.gate.wait(5)
        for request_id in [*scheduler_output.finished_request_ids, *scheduler_output.preempted_request_ids]:
            self.states.pop(request_id, None)
        for new in scheduler_output.scheduled_new_requests:
            num_output = len(new.output_token_ids)
            self.states[new.request_id] = [len(new.prompt_token_ids) + num_output, num_output]
        if self.fail_ids & set(scheduler_output.num_scheduled_tokens):
            raise RuntimeError("injected fault")
        output = ModelRunnerOutput()
        computed = {r.request_id: r.num_computed_tokens for r in scheduler_output.scheduled_running_requests}
        computed |= {r.request_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_requests}
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            state = self.states[request_id]
            if computed[request_id] + num_tokens == state[0]:
                n = state[1]
                output.sampled_token_ids[request_id] = self.script[n] if n < len(self.script) else EOS
                state[0] += 1
                state[1] += 1
        return output


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


def make_engine(runner, max_model_len=64, max_waiting=64, max_num_batched_tokens=16):
    def make_core(sink):
        config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8, max_waiting=max_waiting
        )
        manager = KVCacheManager(NUM_BLOCKS, 4, enable_prefix_caching=True)
        scheduler = Scheduler(config, manager, eos_token_ids={EOS})
        return EngineCore(scheduler, runner, max_model_len=max_model_len, sink=sink)

    return AsyncEngine(make_core, ByteTokenizer())


def all_blocks_free(engine):
    return engine.core.scheduler.kv_cache_manager.num_free_blocks == NUM_BLOCKS


def request(rid, **params):
    return EngineRequest(rid, [1, 2, 3], SamplingParams(temperature=0.0, **params))


async def collect(engine, req):
    outputs = [o async for o in engine.generate(req)]
    return "".join(o.text for o in outputs), outputs[-1]


async def test_generates_until_eos_and_frees():
    runner = FakeRunner()
    engine = make_engine(runner)
    text, last = await collect(engine, request("a"))
    assert text == "hello world"
    assert last.finish_reason is FinishReason.STOP
    assert last.num_output_tokens == len("hello world") + 1
    assert all_blocks_free(engine)
    await engine.aclose()


async def test_max_tokens_gives_length():
    engine = make_engine(FakeRunner())
    text, last = await collect(engine, request("a", max_tokens=4))
    assert (text, last.finish_reason) == ("hell", FinishReason.LENGTH)
    await engine.aclose()


async def test_context_length_caps_generation():
    engine = make_engine(FakeRunner(), max_model_len=5)
    text, last = await collect(engine, request("a", max_tokens=100))
    assert (text, last.finish_reason) == ("he", FinishReason.LENGTH)
    await engine.aclose()


async def test_stop_string_and_stop_token():
    engine = make_engine(FakeRunner())
    text, last = await collect(engine, request("a", stop=("o w",)))
    assert (text, last.finish_reason, last.stop_reason) == ("hell", FinishReason.STOP, "o w")
    # as in vLLM, a stop token's text stays in the output unless it is a special token
    text, last = await collect(engine, request("b", stop_token_ids=(ord("w"),)))
    assert (text, last.stop_reason) == ("hello w", ord("w"))
    await engine.aclose()


async def test_ignore_eos_runs_to_max_tokens():
    engine = make_engine(FakeRunner(b"ab"))
    _, last = await collect(engine, request("a", ignore_eos=True, max_tokens=6))
    assert last.finish_reason is FinishReason.LENGTH and last.num_output_tokens == 6
    await engine.aclose()


async def test_fault_fails_one_request_and_the_next_succeeds():
    runner = FakeRunner()
    runner.fail_ids.add("bad")
    engine = make_engine(runner)
    with pytest.raises(RequestFailedError, match="injected fault"):
        await collect(engine, request("bad"))
    text, _ = await collect(engine, request("good"))
    assert text == "hello world"
    assert engine.is_running
    await engine.aclose()


async def test_consumer_going_away_aborts_and_frees():
    runner = FakeRunner(b"x" * 200)
    engine = make_engine(runner, max_model_len=250)
    agen = engine.generate(request("a", ignore_eos=True, max_tokens=200))
    await agen.__anext__()
    await agen.aclose()  # what a client disconnect does to the response generator
    for _ in range(100):
        if engine.core.num_unfinished == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.core.num_unfinished == 0
    assert all_blocks_free(engine)
    await engine.aclose()


async def test_requests_queue_fifo_and_all_finish():
    engine = make_engine(FakeRunner())
    results = await asyncio.gather(*(collect(engine, request(f"r{i}")) for i in range(5)))
    assert [t for t, _ in results] == ["hello world"] * 5
    await engine.aclose()


async def test_concurrent_requests_share_steps():
    """Eight requests run together (chunked prefill of 3-token prompts within a 16-token budget)."""
    runner = FakeRunner()
    engine = make_engine(runner, max_num_batched_tokens=8)
    results = await asyncio.gather(*(collect(engine, request(f"r{i}")) for i in range(8)))
    assert [t for t, _ in results] == ["hello world"] * 8
    assert all_blocks_free(engine)
    assert engine.stats().num_running == 0
    await engine.aclose()


async def test_fault_fails_the_whole_step_only():
    runner = FakeRunner()
    runner.gate.clear()  # hold the first step until both requests are queued
    engine = make_engine(runner)
    runner.fail_ids.add("bad")
    bad = asyncio.ensure_future(collect(engine, request("bad")))
    good = asyncio.ensure_future(collect(engine, request("good")))
    await asyncio.sleep(0.05)
    runner.gate.set()
    results = await asyncio.gather(bad, good, return_exceptions=True)
    # "good" may have shared the failing step; either way the engine serves the next request
    assert isinstance(results[0], RequestFailedError)
    text, _ = await collect(engine, request("after"))
    assert text == "hello world" and engine.is_running and all_blocks_free(engine)
    await engine.aclose()


async def test_full_queue_is_busy():
    engine = make_engine(FakeRunner(), max_waiting=0)
    with pytest.raises(ServerBusyError):
        await collect(engine, request("a"))
    await engine.aclose()


async def test_loop_failure_kills_the_engine():
    engine = make_engine(FakeRunner())

    def broken(*args):
        raise RuntimeError("scheduler bug")

    engine.core.scheduler.update_from_output = broken
    with pytest.raises(EngineDeadError, match="scheduler bug"):
        await collect(engine, request("a"))
    assert not engine.is_running
    with pytest.raises(EngineDeadError):
        await collect(engine, request("b"))
    await engine.aclose()
