"""The asyncio facade of the engine: the one interface the HTTP layer uses.

`generate(EngineRequest)` yields EngineOutput deltas with decoded text; `abort(request_id)` stops a
request (its KV is freed in the engine's next step). The EngineCore runs on its own thread and
hands outputs back through `loop.call_soon_threadsafe`; detokenization and stop strings run here,
off the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from vlmserve.engine.engine_core import EngineCore
from vlmserve.errors import EngineDeadError, InvalidRequestError, RequestFailedError, ServerBusyError
from vlmserve.metrics.stats import EngineStats, RequestStats
from vlmserve.protocol.types import EngineOutput, EngineRequest, FinishReason

RequestStatsSink = Callable[[RequestStats], None]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestState:
    """The asyncio side of one request: its output queue and text state."""

    loop: asyncio.AbstractEventLoop
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    queue: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    # time.monotonic() when generate() was called, and when the first generated token arrived
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_output_tokens: int = 0


class AsyncEngine:
    """Submits requests to an EngineCore thread and streams their outputs back."""

    def __init__(
        self,
        core_factory: Any,
        tokenizer: Any,
        *,
        max_waiting_requests: int = 256,
        request_stats_sink: RequestStatsSink | None = None,
    ) -> None:
        """core_factory(sink) -> EngineCore; the engine passes its own output sink."""
        self.tokenizer = tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._states: dict[str, _RequestState] = {}
        self._lock = threading.Lock()
        # called on the event loop with the RequestStats of every request that ends (finished,
        # aborted or failed); settable later (the metrics exporter sets it); its errors are logged
        self.request_stats_sink = request_stats_sink
        self.core: EngineCore = core_factory(self._on_outputs)
        self.core.start()

    @property
    def is_running(self) -> bool:
        return self.core.is_alive

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yields deltas; the last one has finish_reason STOP or LENGTH. Raises ServerBusyError,
        RequestFailedError or EngineDeadError."""
        state = self._register(request)
        finished = False
        finish_reason = "abort"
        try:
            while not finished:
                output = await state.queue.get()
                finished = output.finish_reason is not None
                if finished:
                    finish_reason = output.finish_reason.name.lower()  # type: ignore[union-attr]
                if output.new_token_ids:
                    state.num_output_tokens += len(output.new_token_ids)
                    if state.first_token_time is None:
                        state.first_token_time = time.monotonic()
                if output.finish_reason is FinishReason.ERROR:
                    if not self.is_running:
                        raise EngineDeadError(output.error or "the engine stopped")
                    raise RequestFailedError(output.error or "the request failed")
                if output.finish_reason is FinishReason.ABORT:
                    raise ServerBusyError("the request was aborted by the server")
                if self._process_text(request, state, output):
                    finished, finish_reason = True, "stop"
                yield output
        finally:
            with self._lock:
                self._states.pop(request.request_id, None)
            if not finished:  # the consumer went away (client disconnect) or we raised
                self.core.abort(request.request_id)
            self._report(request, state, finish_reason)

    def stats(self) -> EngineStats:
        """The engine's gauges after its latest step and its counters since the start (an immutable
        snapshot: safe from any thread, consistent within itself)."""
        return self.core.stats

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.core.shutdown)

    # --- helpers ---------------------------------------------------------------------------
    def _register(self, request: EngineRequest) -> _RequestState:
        if not self.is_running:
            raise EngineDeadError(self.core.dead_reason or "the engine is not running")
        if self.core.num_unfinished >= self.max_waiting_requests:
            raise ServerBusyError(f"the server is busy: {self.core.num_unfinished} requests are queued")
        state = _RequestState(
            loop=asyncio.get_running_loop(),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stop_matcher=StopStringMatcher(request.sampling_params.stop),
        )
        with self._lock:
            if request.request_id in self._states:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self._states[request.request_id] = state
        self.core.add_request(request)
        return state

    def _report(self, request: EngineRequest, state: _RequestState, finish_reason: str) -> None:
        sink = self.request_stats_sink
        if sink is None:
            return
        stats = RequestStats(
            request_id=request.request_id,
            finish_reason=finish_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generation_tokens=state.num_output_tokens,
            arrival_time=state.arrival_time,
            first_token_time=state.first_token_time,
            finish_time=time.monotonic(),
        )
        try:
            sink(stats)
        except Exception:  # metrics must never fail a request
            logger.exception("request %s: the request stats sink failed", request.request_id)

    def _process_text(self, request: EngineRequest, state: _RequestState, output: EngineOutput) -> bool:
        """Fills output.text; True when a stop string ended the request here."""
        text = state.stop_matcher.push(state.detokenizer.push(output.new_token_ids))
        if state.stop_matcher.matched is not None:
            output.text = text
            output.finish_reason = FinishReason.STOP
            output.stop_reason = state.stop_matcher.matched
            self.core.abort(request.request_id)
            return True
        if output.finish_reason is not None:
            text += state.stop_matcher.flush()
        output.text = text
        return False

    def _on_outputs(self, outputs: list[EngineOutput]) -> None:
        """Called on the engine thread: route each output to its request's queue."""
        for output in outputs:
            with self._lock:
                state = self._states.get(output.request_id)
            if state is not None:
                state.loop.call_soon_threadsafe(state.queue.put_nowait, output)
