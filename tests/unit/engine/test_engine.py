"""EngineCore and AsyncEngine driven by a fake model runner (no weights)."""

import asyncio
import threading

import pytest
import torch

from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.engine.engine_core import EngineCore
from vlmserve.errors import RequestFailedError
from vlmserve.protocol.types import EngineRequest, FinishReason, SamplingParams
from vlmserve.runner.sampler import SampleResult

EOS = 0


class FakeRunner:
    """Emits the bytes of a script, then EOS; can be told to fail or to block."""

    device = torch.device("cpu")

    def __init__(self, script=b"hello world"):
        self.script = script
        self.fail_ids: set[str] = set()
        self.live_caches: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def execute(self, request):
        self.gate.wait(5)
        if request.request_id in self.fail_ids:
            raise RuntimeError("injected fault")
        request.kv_cache = object()
        self.live_caches.add(request.request_id)
        request.num_computed_tokens = request.num_tokens
        n = len(request.output_token_ids)
        return SampleResult(self.script[n] if n < len(self.script) else EOS, None)

    def free(self, request):
        request.kv_cache = None
        self.live_caches.discard(request.request_id)


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


def make_engine(runner, max_model_len=64):
    return AsyncEngine(
        lambda sink: EngineCore(runner, eos_token_ids={EOS}, max_model_len=max_model_len, sink=sink),
        ByteTokenizer(),
    )


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
    assert runner.live_caches == set()
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
    runner = FakeRunner(b"x" * 1000)
    engine = make_engine(runner, max_model_len=4096)
    agen = engine.generate(request("a", ignore_eos=True, max_tokens=1000))
    await agen.__anext__()
    await agen.aclose()  # what a client disconnect does to the response generator
    for _ in range(100):
        if not runner.live_caches and engine.core.num_unfinished == 0:
            break
        await asyncio.sleep(0.01)
    assert runner.live_caches == set()
    assert engine.core.num_unfinished == 0
    await engine.aclose()


async def test_requests_queue_fifo_and_all_finish():
    engine = make_engine(FakeRunner())
    results = await asyncio.gather(*(collect(engine, request(f"r{i}")) for i in range(5)))
    assert [t for t, _ in results] == ["hello world"] * 5
    await engine.aclose()
