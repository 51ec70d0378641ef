"""Scheduler driven by a fake runner: budgets, chunked prefill, images, preemption, prefix hits, aborts.

`FakeRunner` keeps per-request state only from SchedulerOutputs (as the real runner must) and checks
the contract on every step: positions, block tables, whole images, encoder inputs once per image.
Its "model" picks each token from the token history, so a recomputed request samples the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vlmserve.engine import kv_cache
from vlmserve.engine.kv_cache import KVCacheManager
from vlmserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig
from vlmserve.errors import ContextLengthExceededError, ServerBusyError
from vlmserve.protocol.types import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    ImageInput,
    SamplingParams,
    TokenLogprob,
)

EOS = 2
IMAGE_TOKEN = 99
BLOCK_SIZE = 4


def create_scheduler(
    *,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    max_waiting: int = 64,
    num_blocks: int = 256,
    block_size: int = BLOCK_SIZE,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_waiting=max_waiting
    )
    manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(config, manager, eos_token_ids={EOS})


def create_requests(
    num_requests: int,
    num_tokens: int = 10,
    *,
    max_tokens: int = 16,
    same_prompt: bool = False,
    images: list[ImageInput] | None = None,
    prompt_token_ids: list[int] | None = None,
    start_id: int = 0,
    max_model_len: int = 4096,
    **sampling: Any,
) -> list[Request]:
    """Distinct prompts of num_tokens tokens (or `prompt_token_ids` for all), ids "0", "1", ..."""
    requests = []
    for index in range(start_id, start_id + num_requests):
        token_ids = prompt_token_ids or [
            1000 + (0 if same_prompt else index * 100) + i for i in range(num_tokens)
        ]
        engine_request = EngineRequest(
            request_id=str(index),
            prompt_token_ids=list(token_ids),
            sampling_params=SamplingParams(max_tokens=max_tokens, **sampling),
            images=list(images or []),
        )
        requests.append(Request.from_engine_request(engine_request, max_model_len=max_model_len))
    return requests


def image_prompt(content_hash: str, *, before: int, length: int, after: int) -> tuple[list[int], ImageInput]:
    token_ids = list(range(10, 10 + before)) + [IMAGE_TOKEN] * length + list(range(50, 50 + after))
    image = ImageInput(
        pixel_values=None, num_tiles=1, content_hash=content_hash, offset=before, length=length
    )
    return token_ids, image


def fake_token(token_ids: list[int]) -> int:
    return 500 + (len(token_ids) * 7 + token_ids[-1]) % 97


@dataclass
class _RunnerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    images: list[ImageInput]
    encoded: set[int] = field(default_factory=set)


class FakeRunner:
    """Holds what a runner may know (SchedulerOutputs only) and asserts the contract each step."""

    def __init__(
        self, block_size: int = BLOCK_SIZE, token_fn: Callable[[list[int]], int] = fake_token
    ) -> None:
        self.block_size = block_size
        self.token_fn = token_fn
        self.states: dict[str, _RunnerState] = {}
        self.num_encoded_images = 0

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in output.finished_request_ids | set(output.preempted_request_ids):
            self.states.pop(request_id, None)
        for new in output.scheduled_new_requests:
            assert new.request_id not in self.states
            assert new.num_computed_tokens % self.block_size == 0
            token_ids = new.prompt_token_ids + new.output_token_ids
            self.states[new.request_id] = _RunnerState(
                token_ids, list(new.block_ids), new.num_computed_tokens, new.images
            )
        for running in output.scheduled_running_requests:
            state = self.states[running.request_id]
            assert state.num_computed_tokens == running.num_computed_tokens
            state.block_ids += running.new_block_ids
        assert set(output.num_scheduled_tokens) == {
            r.request_id for r in output.scheduled_new_requests + output.scheduled_running_requests
        }
        assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens.values())
        self._check_written_blocks(output)
        sampled = {}
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            token_id = self._compute(
                request_id, num_tokens, output.scheduled_encoder_inputs.get(request_id, [])
            )
            if token_id is not None:
                sampled[request_id] = token_id
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def _compute(self, request_id: str, num_tokens: int, encoder_inputs: list[int]) -> int | None:
        state = self.states[request_id]
        start, end = state.num_computed_tokens, state.num_computed_tokens + num_tokens
        assert num_tokens > 0 and end <= len(state.token_ids)
        assert len(state.block_ids) * self.block_size >= end, "the block table must cover every slot"
        for index, image in enumerate(state.images):
            overlaps = image.offset < end and image.offset + image.length > start
            if overlaps:  # the encoder needs the image whole, and runs once per image
                assert start <= image.offset and image.offset + image.length <= end, "image split"
                assert index not in state.encoded
                state.encoded.add(index)
                self.num_encoded_images += 1
            assert overlaps == (index in encoder_inputs)
        state.num_computed_tokens = end
        if end < len(state.token_ids):
            return None
        token_id = self.token_fn(state.token_ids)
        state.token_ids.append(token_id)
        return token_id

    def _check_written_blocks(self, output: SchedulerOutput) -> None:
        """A block written this step is held by no other request (shared blocks are read-only)."""
        written: dict[int, str] = {}
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            state = self.states[request_id]
            start = state.num_computed_tokens
            for position in range(start, start + num_tokens):
                block_id = state.block_ids[position // self.block_size]
                assert written.setdefault(block_id, request_id) == request_id
        for block_id, writer in written.items():
            for request_id, state in self.states.items():
                assert request_id == writer or block_id not in state.block_ids


@dataclass
class RunResult:
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, FinishReason] = field(default_factory=dict)
    outputs: list[EngineOutput] = field(default_factory=list)
    schedules: list[SchedulerOutput] = field(default_factory=list)

    def collect(self, scheduler_output: SchedulerOutput, outputs: list[EngineOutput]) -> None:
        self.schedules.append(scheduler_output)
        for output in outputs:
            self.outputs.append(output)
            self.token_ids.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                self.finish_reasons[output.request_id] = output.finish_reason


def step(scheduler: Scheduler, runner: FakeRunner, result: RunResult | None = None) -> list[EngineOutput]:
    scheduler_output = scheduler.schedule()
    outputs = scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
    if result is not None:
        result.collect(scheduler_output, outputs)
    return outputs


def run_to_completion(
    scheduler: Scheduler,
    runner: FakeRunner | None = None,
    result: RunResult | None = None,
    max_steps: int = 1000,
) -> RunResult:
    """Steps until every request has ended, then checks that every block is back."""
    runner = runner or FakeRunner(scheduler.kv_cache_manager.block_size)
    result = result or RunResult()
    for _ in range(max_steps):
        if not scheduler.num_unfinished_requests:
            break
        step(scheduler, runner, result)
    assert scheduler.num_unfinished_requests == 0
    assert_blocks_released(scheduler)
    return result


def assert_blocks_released(scheduler: Scheduler) -> None:
    """Every block is free (cached ones evictable), held by nobody."""
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.block_pool.num_blocks
    assert all(block.ref_cnt == 0 for block in manager.block_pool.blocks)
    assert not manager.req_to_blocks and not manager.num_cached_blocks
    assert manager.usage == 0.0


def add_all(scheduler: Scheduler, requests: list[Request]) -> None:
    for request in requests:
        scheduler.add_request(request)


# --- budgets and chunking --------------------------------------------------------------------------
def test_token_budget_is_respected_every_step() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=64)
    add_all(scheduler, create_requests(10, num_tokens=30, max_tokens=5))
    result = run_to_completion(scheduler)
    assert all(s.total_num_scheduled_tokens <= 64 for s in result.schedules)
    assert result.schedules[0].num_scheduled_tokens == {"0": 30, "1": 30, "2": 4}
    assert all(len(ids) == 5 for ids in result.token_ids.values())
    assert set(result.finish_reasons.values()) == {FinishReason.LENGTH}


def test_chunked_prefill_samples_only_when_the_prompt_is_done() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner()
    add_all(scheduler, create_requests(1, num_tokens=100, max_tokens=3))
    chunks, outputs = [], []
    for _ in range(4):
        outputs.append(step(scheduler, runner))
        chunks.append(scheduler.requests["0"].num_computed_tokens)
    assert chunks == [32, 64, 96, 100]
    assert [len(o) for o in outputs] == [0, 0, 0, 1]
    assert step(scheduler, runner)[0].num_output_tokens == 2  # then one token per step


def test_a_token_sampled_for_a_partial_chunk_is_ignored() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    add_all(scheduler, create_requests(1, num_tokens=20))
    scheduler_output = scheduler.schedule()
    runner_output = ModelRunnerOutput(sampled_token_ids={"0": 7})
    assert scheduler.update_from_output(scheduler_output, runner_output) == []
    assert scheduler.requests["0"].output_token_ids == []


def test_decodes_go_before_a_running_prefill() -> None:
    """A (earlier, an image that cannot start in step 1) is still prefilling when B decodes."""
    token_ids, image = image_prompt("img", before=2, length=8, after=30)
    request_a = create_requests(1, prompt_token_ids=token_ids, images=[image])[0]
    request_b = create_requests(1, num_tokens=2, start_id=1)[0]
    scheduler = create_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    runner = FakeRunner()
    add_all(scheduler, [request_a, request_b])
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {"0": 2, "1": 2}  # A's chunk stops at the image
    scheduler.update_from_output(first, runner.execute(first))
    second = scheduler.schedule()
    # B's decode first; A's image cannot fit in the 7 tokens left and no other prefill runs: it extends
    assert list(second.num_scheduled_tokens.items()) == [("1", 1), ("0", 8)]
    scheduler.update_from_output(second, runner.execute(second))
    third = scheduler.schedule()
    assert list(third.num_scheduled_tokens.items()) == [("1", 1), ("0", 7)]  # A takes what is left


def test_max_num_seqs_caps_running_requests() -> None:
    scheduler = create_scheduler(max_num_seqs=2)
    runner = FakeRunner()
    add_all(scheduler, create_requests(5, max_tokens=2))
    step(scheduler, runner)
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 3
    result = run_to_completion(scheduler, runner)
    assert all(len(s.num_scheduled_tokens) <= 2 for s in result.schedules)


# --- images ------------------------------------------------------------------------------------------
def test_chunk_boundary_moves_to_the_image_start() -> None:
    token_ids, image = image_prompt("img", before=10, length=16, after=4)
    scheduler = create_scheduler(max_num_batched_tokens=16)
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], max_tokens=2))
    result = run_to_completion(scheduler)
    assert [s.num_scheduled_tokens["0"] for s in result.schedules[:3]] == [10, 16, 4]
    assert [s.scheduled_encoder_inputs for s in result.schedules[:3]] == [{}, {"0": [0]}, {}]


def test_an_image_larger_than_the_budget_is_scheduled_whole() -> None:
    token_ids, image = image_prompt("img", before=0, length=40, after=4)
    scheduler = create_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner()
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], max_tokens=2))
    run_to_completion(scheduler, runner)
    assert runner.num_encoded_images == 1


def test_an_image_waits_while_another_prefill_holds_the_budget() -> None:
    token_ids, image = image_prompt("img", before=0, length=12, after=2)
    scheduler = create_scheduler(max_num_batched_tokens=16)
    add_all(scheduler, create_requests(1, num_tokens=10, max_tokens=1))
    add_all(
        scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], start_id=1, max_tokens=1)
    )
    assert scheduler.schedule().num_scheduled_tokens == {"0": 10}  # 6 left, the image waits


def test_images_are_encoded_once_per_computation() -> None:
    token_ids, image = image_prompt("img", before=3, length=12, after=5)
    second_image = ImageInput(pixel_values=None, num_tiles=1, content_hash="two", offset=20, length=6)
    token_ids += [IMAGE_TOKEN] * 6 + [7, 8]
    scheduler = create_scheduler(max_num_batched_tokens=10, max_num_seqs=4, enable_prefix_caching=False)
    runner = FakeRunner()
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[second_image, image]))
    run_to_completion(scheduler, runner)
    assert runner.num_encoded_images == 2


# --- preemption --------------------------------------------------------------------------------------
def test_preemption_takes_the_latest_arrival_and_recomputes() -> None:
    # 3 prompts of 2 blocks each fill 6 of 7 blocks; each decode then needs a third block
    scheduler = create_scheduler(num_blocks=7, enable_prefix_caching=False)
    runner, result = FakeRunner(), RunResult()
    add_all(scheduler, create_requests(3, num_tokens=8, max_tokens=6))
    step(scheduler, runner, result)
    second = scheduler.schedule()
    # A takes the last free block; B needs one and preempts C (the latest), not itself
    assert second.preempted_request_ids == ["2"]
    assert second.num_scheduled_tokens == {"0": 1, "1": 1}
    preempted = scheduler.requests["2"]
    assert preempted.status == RequestStatus.WAITING and preempted.num_computed_tokens == 0
    assert list(scheduler.waiting) == [preempted] and len(preempted.output_token_ids) == 1
    assert scheduler.kv_cache_manager.get_block_ids("2") == []
    result.collect(second, scheduler.update_from_output(second, runner.execute(second)))
    run_to_completion(scheduler, runner, result)
    resumed = [r for s in result.schedules for r in s.scheduled_new_requests if r.request_id == "2"][-1]
    assert len(resumed.output_token_ids) >= 1 and resumed.num_computed_tokens == 0
    # recompute gives what an unpressured run gives
    reference = create_scheduler(num_blocks=64)
    add_all(reference, create_requests(3, num_tokens=8, max_tokens=6))
    assert result.token_ids == run_to_completion(reference).token_ids
    assert sum(len(s.preempted_request_ids) for s in result.schedules) >= 1


def test_preempted_requests_return_to_the_front_in_arrival_order() -> None:
    # A and B hold 2 blocks each, C one: all 5 blocks; every decode then needs a new block
    scheduler = create_scheduler(num_blocks=5, enable_prefix_caching=False)
    runner = FakeRunner()
    add_all(scheduler, create_requests(2, num_tokens=8, max_tokens=12))
    add_all(scheduler, create_requests(1, num_tokens=4, max_tokens=12, start_id=2))
    step(scheduler, runner)
    add_all(scheduler, create_requests(1, num_tokens=4, start_id=3))
    scheduler_output = scheduler.schedule()
    # A's decode preempts C; B's then finds no block and preempts itself (the latest left)
    assert scheduler_output.preempted_request_ids == ["2", "1"]
    assert [r.request_id for r in scheduler.waiting] == ["1", "2", "3"]
    assert scheduler_output.num_scheduled_tokens == {"0": 1}  # nothing admitted in a preempting step
    assert scheduler.make_stats().num_preemptions == 2
    scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
    run_to_completion(scheduler, runner)


def test_a_preempted_request_hits_its_own_cached_prefix() -> None:
    scheduler = create_scheduler(num_blocks=7)
    runner, result = FakeRunner(), RunResult()
    add_all(scheduler, create_requests(3, num_tokens=8, max_tokens=4))
    step(scheduler, runner, result)
    second = scheduler.schedule()
    assert second.preempted_request_ids == ["2"]  # its 2 cached blocks go to the free queue, tail first
    result.collect(second, scheduler.update_from_output(second, runner.execute(second)))
    run_to_completion(scheduler, runner, result)
    resumed = next(r for s in result.schedules for r in s.scheduled_new_requests if r.num_computed_tokens)
    # B's decode took the freed tail block; the first block survived and is hit
    assert (resumed.request_id, resumed.num_computed_tokens) == ("2", 4)


# --- prefix caching ----------------------------------------------------------------------------------
def test_shared_prefix_hits_for_a_later_request() -> None:
    scheduler = create_scheduler()
    runner = FakeRunner()
    system_prompt = list(range(300, 316))
    add_all(scheduler, create_requests(1, prompt_token_ids=[*system_prompt, 1, 2, 3]))
    step(scheduler, runner)
    add_all(scheduler, create_requests(1, prompt_token_ids=[*system_prompt, 7, 8], start_id=1))
    scheduler_output = scheduler.schedule()
    new = scheduler_output.scheduled_new_requests[0]
    assert (new.num_computed_tokens, scheduler_output.num_scheduled_tokens["1"]) == (16, 2)
    assert new.block_ids[:4] == scheduler.kv_cache_manager.get_block_ids("0")[:4]
    assert scheduler.requests["1"].num_cached_tokens == 16
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (19 + 18, 16)
    scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
    run_to_completion(scheduler, runner)


def test_blocks_are_cached_only_after_the_step_that_computes_them() -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(2, num_tokens=17, same_prompt=True))
    scheduler_output = scheduler.schedule()
    assert [r.num_computed_tokens for r in scheduler_output.scheduled_new_requests] == [0, 0]


def test_same_tokens_with_a_different_image_get_no_prefix_hit() -> None:
    assert _second_request_hit("cat", "dog") == 0
    assert _second_request_hit("cat", "cat") == 16


def test_token_only_hashing_would_share_kv_across_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above fails with token-only keys: without extra keys the dog prompt hits the cat's KV."""
    monkeypatch.setattr(kv_cache, "image_extra_keys", lambda images, start, end: ())
    assert _second_request_hit("cat", "dog") == 16


def _second_request_hit(first_hash: str, second_hash: str) -> int:
    """Prefix-cache hit (tokens) of a prompt with the second image after one with the first."""
    scheduler = create_scheduler()
    runner = FakeRunner()
    requests = []
    for index, content_hash in enumerate((first_hash, second_hash)):
        # block 0 holds image tokens already, so a different image shares nothing
        token_ids, image = image_prompt(content_hash, before=2, length=12, after=3)
        requests += create_requests(1, prompt_token_ids=token_ids, images=[image], start_id=index)
        scheduler.add_request(requests[-1])
        step(scheduler, runner)  # the first prompt's blocks are cached after this step
    run_to_completion(scheduler, runner)
    return requests[1].num_cached_tokens


def test_a_cache_hit_ending_inside_an_image_is_cut_to_the_image() -> None:
    token_ids, image = image_prompt("img", before=6, length=12, after=2)  # image at [6, 18)
    scheduler = create_scheduler()
    runner = FakeRunner()
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], max_tokens=1))
    run_to_completion(scheduler, runner)
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], start_id=1))
    scheduler_output = scheduler.schedule()
    # 16 tokens are cached, but 16 is inside the image: the hit stops at block 1 (token 4)
    assert scheduler_output.scheduled_new_requests[0].num_computed_tokens == 4
    assert scheduler_output.scheduled_encoder_inputs == {"1": [0]}


# --- admission, aborts, stop conditions -----------------------------------------------------------------
def test_a_full_waiting_queue_raises_server_busy() -> None:
    scheduler = create_scheduler(max_waiting=2)
    add_all(scheduler, create_requests(2))
    with pytest.raises(ServerBusyError) as excinfo:
        scheduler.add_request(create_requests(1, start_id=2)[0])
    assert excinfo.value.retry_after == 1 and excinfo.value.status == 503


def test_a_request_larger_than_the_kv_cache_is_refused() -> None:
    scheduler = create_scheduler(num_blocks=4)
    with pytest.raises(ContextLengthExceededError):
        scheduler.add_request(create_requests(1, num_tokens=10, max_tokens=10)[0])


def test_abort_frees_waiting_and_running_requests_at_once() -> None:
    scheduler = create_scheduler(max_num_seqs=1)
    runner = FakeRunner()
    add_all(scheduler, create_requests(2, num_tokens=10))
    step(scheduler, runner)
    waiting_output = scheduler.abort("1")
    assert waiting_output is not None and waiting_output.finish_reason is FinishReason.ABORT
    assert scheduler.kv_cache_manager.num_free_blocks < scheduler.kv_cache_manager.block_pool.num_blocks
    running_output = scheduler.abort("0")
    assert running_output is not None and running_output.num_output_tokens == 1
    assert_blocks_released(scheduler)
    assert scheduler.abort("0") is None
    assert scheduler.schedule().finished_request_ids == {"0", "1"}
    assert scheduler.schedule().finished_request_ids == set()


def test_finish_request_reports_an_error() -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1))
    output = scheduler.finish_request("0", RequestStatus.FINISHED_ERROR, error="boom")
    assert output is not None and output.finish_reason is FinishReason.ERROR and output.error == "boom"


@pytest.mark.parametrize(
    ("sampling", "token", "finish_reason", "stop_reason", "num_tokens"),
    [
        ({}, EOS, FinishReason.STOP, None, 1),
        ({"stop_token_ids": (77,)}, 77, FinishReason.STOP, 77, 1),
        ({"ignore_eos": True}, EOS, FinishReason.LENGTH, None, 4),
        ({}, 5, FinishReason.LENGTH, None, 4),
    ],
)
def test_stop_conditions(
    sampling: dict[str, Any],
    token: int,
    finish_reason: FinishReason,
    stop_reason: int | None,
    num_tokens: int,
) -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, max_tokens=4, **sampling))
    result = run_to_completion(scheduler, FakeRunner(token_fn=lambda ids: token))
    assert len(result.token_ids["0"]) == num_tokens
    assert result.finish_reasons["0"] is finish_reason
    assert result.outputs[-1].stop_reason == stop_reason


def test_max_model_len_ends_the_request() -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, num_tokens=10, max_tokens=100, max_model_len=13))
    result = run_to_completion(scheduler)
    assert len(result.token_ids["0"]) == 3 and result.finish_reasons["0"] is FinishReason.LENGTH


def test_logprobs_are_passed_through() -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, num_tokens=4))
    scheduler_output = scheduler.schedule()
    logprob = TokenLogprob(token_id=9, logprob=-0.5)
    runner_output = ModelRunnerOutput(sampled_token_ids={"0": 9}, logprobs={"0": logprob})
    assert scheduler.update_from_output(scheduler_output, runner_output)[0].logprobs == [logprob]


def test_stats_report_gauges_and_reset_counters() -> None:
    scheduler = create_scheduler(max_num_seqs=1)
    add_all(scheduler, create_requests(2, num_tokens=8))
    step(scheduler, FakeRunner())
    stats = scheduler.make_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.kv_cache_usage == pytest.approx(2 / 256)  # 8 computed tokens in 2 blocks
    assert stats.prefix_cache_queries == 8
    assert scheduler.make_stats().prefix_cache_queries == 0


# --- everything at once --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_the_contract_and_releases_every_block(seed: int) -> None:
    """Arrivals, aborts, shared prefixes and images over a pool small enough to preempt."""
    rng = random.Random(seed)
    scheduler = create_scheduler(max_num_batched_tokens=24, max_num_seqs=6, num_blocks=16)
    runner, result = FakeRunner(), RunResult()
    shared = [rng.randrange(3, 90) for _ in range(12)]
    for index in range(40):
        if rng.random() < 0.6:
            _add_random_request(scheduler, rng, index, shared)
        if scheduler.num_unfinished_requests and rng.random() < 0.1:
            scheduler.abort(rng.choice(list(scheduler.requests)))
        if scheduler.num_unfinished_requests:
            step(scheduler, runner, result)
    run_to_completion(scheduler, runner, result)
    assert all(s.total_num_scheduled_tokens <= 24 for s in result.schedules)  # images here fit the budget
    assert any(s.preempted_request_ids for s in result.schedules)
    assert any(r.num_computed_tokens for s in result.schedules for r in s.scheduled_new_requests)


def _add_random_request(scheduler: Scheduler, rng: random.Random, index: int, shared: list[int]) -> None:
    token_ids = shared[: rng.randrange(0, 13)] + [rng.randrange(3, 90) for _ in range(rng.randrange(1, 10))]
    images = []
    if rng.random() < 0.5:
        length = rng.randrange(4, 17)
        images.append(ImageInput(None, 1, rng.choice("ab"), offset=len(token_ids), length=length))
        token_ids += [IMAGE_TOKEN] * length + [5]
    request = create_requests(
        1, prompt_token_ids=token_ids, images=images, start_id=index, max_tokens=rng.randrange(1, 12)
    )[0]
    scheduler.add_request(request)
