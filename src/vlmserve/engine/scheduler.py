"""Continuous batching: which requests compute how many tokens in each step, and what came of it.

Owns the waiting queue, the running list and the request table; asks the KVCacheManager for
blocks. `schedule()` -> SchedulerOutput, `update_from_output()` -> EngineOutput deltas. Pure Python:
no tensors, no threads, no asyncio (EngineCore calls it from its own thread).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from vlmserve.engine.kv_cache import KVCacheBlock, KVCacheManager
from vlmserve.engine.outputs import (
    EncoderSlice,
    ModelRunnerOutput,
    NewRequestData,
    RunningRequestData,
    SchedulerOutput,
)
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.errors import ContextLengthExceededError, ServerBusyError
from vlmserve.metrics.stats import SchedulerStats
from vlmserve.protocol.types import EngineOutput


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of the scheduler; bootstrap builds it from ServerConfig."""

    # the token budget: most tokens all requests together compute in one step
    max_num_batched_tokens: int = 2048
    # most requests running (holding KV blocks) at once
    max_num_seqs: int = 64
    # most requests waiting for admission; add_request raises ServerBusyError beyond it
    max_waiting: int = 256
    # the Retry-After (seconds) a client is told when the waiting queue is full
    retry_after_s: int = 1
    # the encoder budget: most image tiles the vision encoder runs in one step, so that a large
    # image is encoded over several steps between other requests' decodes; 0: no budget (an image
    # is encoded whole in the step whose chunk covers it)
    max_encoder_tiles_per_step: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_waiting < 0 or self.max_encoder_tiles_per_step < 0:
            raise ValueError("max_num_seqs must be >= 1, max_waiting and max_encoder_tiles_per_step >= 0")
        # every running request's decode must fit in one step's budget
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )


@dataclass(slots=True)
class _StepPlan:
    """What schedule() has decided so far in this step."""

    token_budget: int
    # tiles the vision encoder may still run in this step (only read with an encoder budget)
    encoder_budget: int = 0
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    new_requests: list[Request] = field(default_factory=list)
    running_requests: list[Request] = field(default_factory=list)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    encoder_slices: dict[str, list[EncoderSlice]] = field(default_factory=dict)
    preempted_request_ids: list[str] = field(default_factory=list)
    # a chunk of more than one token is scheduled (only the first such chunk may exceed the budget)
    has_prefill: bool = False

    def add(self, request: Request, num_tokens: int, new_block_ids: list[int] | None) -> None:
        """new_block_ids None: a new request (its whole block table goes out)."""
        start = request.num_computed_tokens
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.token_budget -= num_tokens
        self.has_prefill |= num_tokens > 1
        if new_block_ids is None:
            self.new_requests.append(request)
        else:
            self.running_requests.append(request)
            self.new_block_ids[request.request_id] = new_block_ids
        images = [
            index
            for index, image in enumerate(request.images)
            if image.offset < start + num_tokens and image.offset + image.length > start
        ]
        if images:
            self.encoder_inputs[request.request_id] = images

    def remove(self, request: Request) -> None:
        """Takes back a running request scheduled earlier in this step (it was just preempted)."""
        self.token_budget += self.num_scheduled_tokens.pop(request.request_id, 0)
        self.new_block_ids.pop(request.request_id, None)
        self.encoder_inputs.pop(request.request_id, None)
        self.encoder_slices.pop(request.request_id, None)
        if request in self.running_requests:
            self.running_requests.remove(request)


class Scheduler:
    """Token-budget continuous batching with chunked prefill and preemption by recompute.

    Requests move waiting -> running -> finished; a preempted request goes back to the front of
    waiting with its KV freed and num_computed_tokens reset to 0. `running` is kept in arrival
    order, so the most recent arrival (the first to be preempted) is always `running[-1]`.
    """

    def __init__(
        self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, *, eos_token_ids: set[int]
    ) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_request_ids: set[str] = set()
        self._num_arrivals = 0
        self._num_preemptions = 0
        self._num_images_cached = 0

    # --- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues a request (FCFS). Raises ServerBusyError when max_waiting requests already wait,
        ContextLengthExceededError when the request could never fit in the whole KV cache."""
        if len(self.waiting) >= self.config.max_waiting:
            raise ServerBusyError(
                f"{len(self.waiting)} requests are waiting already", retry_after=self.config.retry_after_s
            )
        manager = self.kv_cache_manager
        capacity = manager.block_pool.num_blocks * manager.block_size
        if request.max_num_tokens > capacity:
            raise ContextLengthExceededError(
                f"the request may reach {request.max_num_tokens} tokens; the KV cache holds {capacity}"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id} is already in the engine")
        request.arrival_index = self._num_arrivals
        self._num_arrivals += 1
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> EngineOutput | None:
        """Ends a waiting or running request now, freeing its blocks; its final output, or None
        when the request is unknown (finished already)."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, error: str | None = None
    ) -> EngineOutput | None:
        """Ends a request with `status` (aborted, failed); its final, tokenless output."""
        assert status.is_finished
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        output = self._output(request, [])
        output.finish_reason = request.finish_reason
        output.error = error
        return output

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # --- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decides this step's tokens: {request_id: num_tokens} within the token budget.

        There are no prefill and decode phases: every request has num_computed_tokens catching up
        with num_tokens (vLLM v1). Running requests go first, decodes (one token) before running
        prefills, then waiting requests in FCFS order, their prefills chunked to the budget left.
        A running request that cannot get a block preempts the latest-arrived running request
        (possibly itself); no waiting request is admitted in a step that preempted.
        """
        plan = _StepPlan(
            token_budget=self.config.max_num_batched_tokens,
            encoder_budget=self.config.max_encoder_tiles_per_step,
        )
        self._schedule_running(plan)
        if not plan.preempted_request_ids:
            self._schedule_waiting(plan)
        output = self._make_output(plan)
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += num_tokens
        self.finished_request_ids = set()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineOutput]:
        """Registers the step's computed blocks in the prefix cache, appends the sampled token of
        every request whose scheduled tokens reached its end, ends the requests that stop, and
        returns one EngineOutput delta per sampled token."""
        self._update_encoded(runner_output)
        outputs: list[EngineOutput] = []
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
            if request.num_computed_tokens < request.num_tokens:
                continue  # a partial prefill chunk: nothing sampled
            outputs.append(self._append_token(request, runner_output))
        return outputs

    def make_stats(self) -> SchedulerStats:
        """The current gauges, and the counters since the previous call."""
        prefix_cache_stats = self.kv_cache_manager.make_prefix_cache_stats()
        stats = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix_cache_stats.queries,
            prefix_cache_hits=prefix_cache_stats.hits,
            num_preemptions=self._num_preemptions,
            num_images_cached=self._num_images_cached,
        )
        self._num_preemptions = 0
        self._num_images_cached = 0
        return stats

    # --- scheduling ----------------------------------------------------------------------------
    def _schedule_running(self, plan: _StepPlan) -> None:
        # decodes first (sorted is stable: arrival order within each group)
        for request in sorted(self.running, key=_is_prefilling):
            if request.status != RequestStatus.RUNNING or plan.token_budget <= 0:
                continue  # preempted earlier in this loop, or the budget is spent
            num_new_tokens = self._num_new_tokens(request, request.num_computed_tokens, plan)
            if num_new_tokens == 0:
                continue
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens, plan)
            if new_block_ids is not None:
                plan.add(request, num_new_tokens, new_block_ids)

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, plan: _StepPlan
    ) -> list[int] | None:
        """Blocks for a running request, preempting the latest arrivals until they fit; None when
        the request had to preempt itself."""
        while (new_block_ids := self.kv_cache_manager.allocate_slots(request, num_new_tokens)) is None:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return None
        return new_block_ids

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        plan.remove(request)
        plan.preempted_request_ids.append(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_encoded_tiles.clear()
        request.num_preemptions += 1
        self._num_preemptions += 1
        # preempted requests arrived before everything still waiting: they go first
        self.waiting.appendleft(request)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admits waiting requests in FCFS order; stops at the first that does not fit."""
        while self.waiting and plan.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_computed_tokens = self._computed_prefix(request)
            num_new_tokens = self._num_new_tokens(request, num_computed_tokens, plan)
            if num_new_tokens == 0:
                return
            if self.kv_cache_manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed_tokens
            self._num_images_cached += sum(
                1 for image in request.images if image.offset + image.length <= num_computed_tokens
            )
            bisect.insort(self.running, request, key=lambda running: running.arrival_index)
            plan.add(request, num_new_tokens, new_block_ids=None)

    def _computed_prefix(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The prefix-cache hit, cut back so that it does not end inside an image's span (the
        next chunk then starts at the image, which the encoder needs whole)."""
        blocks, num_computed_tokens = self.kv_cache_manager.get_computed_blocks(request)
        block_size = self.kv_cache_manager.block_size
        for image in reversed(request.images):
            if image.offset < num_computed_tokens < image.offset + image.length:
                num_computed_tokens = image.offset // block_size * block_size
        return blocks[: num_computed_tokens // block_size], num_computed_tokens

    def _num_new_tokens(self, request: Request, start: int, plan: _StepPlan) -> int:
        """Tokens to compute from `start` within the budget left, never ending inside an image.

        A chunk boundary that would fall inside an image's placeholder span moves back to the
        image's start. When the chunk starts at that image (it cannot fit in what is left), the
        request waits for a later step; but if no other prefill chunk is scheduled in this step, the
        chunk extends to the image's end and the step goes over the budget. That choice keeps an
        image larger than max_num_batched_tokens from waiting forever; decodes do not block it.
        """
        end = start + min(request.num_tokens - start, plan.token_budget)
        for image in request.images:
            image_end = image.offset + image.length
            if image.offset < end < image_end:
                if image.offset > start:
                    end = image.offset
                elif not plan.has_prefill:
                    end = image_end
                else:
                    end = start
                break
        if self.config.max_encoder_tiles_per_step:
            end = self._schedule_encoder(request, start, end, plan)
        return end - start

    def _schedule_encoder(self, request: Request, start: int, end: int, plan: _StepPlan) -> int:
        """With an encoder budget: schedules the next tiles of the chunk [start, end)'s images that are
        not encoded yet, within the step's encoder budget, and cuts the chunk back to the start of
        the first image still incomplete after this step (its tokens wait until all its tiles are
        encoded; the tokens before it go ahead)."""
        for index, image in enumerate(request.images):
            if image.offset >= end:
                break
            if image.offset + image.length <= start:
                continue
            done = request.num_encoded_tiles.get(index, 0)
            if done < image.num_tiles and plan.encoder_budget > 0:
                tiles = min(plan.encoder_budget, image.num_tiles - done)
                plan.encoder_budget -= tiles
                plan.encoder_slices.setdefault(request.request_id, []).append(
                    EncoderSlice(index, image, done, done + tiles)
                )
                done = request.num_encoded_tiles[index] = done + tiles
            if done < image.num_tiles:
                return image.offset
        return end

    def _update_encoded(self, runner_output: ModelRunnerOutput) -> None:
        """Images the runner holds whole (an encoder-cache hit): no more slices for them."""
        for request_id, indices in runner_output.encoded_images.items():
            request = self.requests.get(request_id)
            if request is not None:
                for index in indices:
                    request.num_encoded_tiles[index] = request.images[index].num_tiles

    def _make_output(self, plan: _StepPlan) -> SchedulerOutput:
        new_requests = [
            NewRequestData(
                request_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.engine_request.sampling_params,
                images=list(request.images),
                block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                num_computed_tokens=request.num_computed_tokens,
            )
            for request in plan.new_requests
        ]
        running_requests = [
            RunningRequestData(
                request_id=request.request_id,
                new_block_ids=plan.new_block_ids[request.request_id],
                num_computed_tokens=request.num_computed_tokens,
            )
            for request in plan.running_requests
        ]
        return SchedulerOutput(
            scheduled_new_requests=new_requests,
            scheduled_running_requests=running_requests,
            num_scheduled_tokens=dict(plan.num_scheduled_tokens),
            total_num_scheduled_tokens=sum(plan.num_scheduled_tokens.values()),
            scheduled_encoder_inputs=dict(plan.encoder_inputs),
            preempted_request_ids=list(plan.preempted_request_ids),
            finished_request_ids=set(self.finished_request_ids),
            scheduled_encoder_slices={rid: list(slices) for rid, slices in plan.encoder_slices.items()},
        )

    # --- results -------------------------------------------------------------------------------
    def _append_token(self, request: Request, runner_output: ModelRunnerOutput) -> EngineOutput:
        request_id = request.request_id
        token_id = runner_output.sampled_token_ids[request_id]
        request.output_token_ids.append(token_id)
        guide_error = runner_output.guide_errors.get(request_id)
        if guide_error is not None:
            status: RequestStatus | None = RequestStatus.FINISHED_ERROR
        elif request_id in runner_output.guides_finished:
            # the structured output is whole and nothing but eos may follow: stop, ignore_eos or not
            # (and STOP rather than LENGTH when it completes on the last allowed token)
            status = RequestStatus.FINISHED_STOPPED
        else:
            status = self._check_stop(request, token_id)
        if status is not None:
            self._finish(request, status)
        output = self._output(request, [token_id])
        logprob = runner_output.logprobs.get(request_id)
        if logprob is not None:
            output.logprobs.append(logprob)
        output.finish_reason = request.finish_reason
        output.stop_reason = request.stop_reason
        if guide_error is not None:
            output.error = f"structured output failed: {guide_error}"
        return output

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """eos, stop_token_ids, max_tokens and max_model_len (via max_num_tokens), as EngineCore does."""
        params = request.engine_request.sampling_params
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= request.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)  # O(n), but only for aborts of waiting requests
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_request_ids.add(request.request_id)

    @staticmethod
    def _output(request: Request, new_token_ids: list[int]) -> EngineOutput:
        return EngineOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
        )


def _is_prefilling(request: Request) -> bool:
    """More than one token to compute: a prefill (or a recompute after preemption), not a decode."""
    return request.num_tokens - request.num_computed_tokens > 1
