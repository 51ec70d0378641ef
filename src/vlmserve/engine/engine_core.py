"""The engine loop: one thread that owns the Scheduler and the model runner.

`step()` is schedule -> execute -> update, around the Scheduler's continuous batching and the
runner's flat batch. Adds and aborts arrive from other threads through an inbox drained between
steps; every EngineOutput delta leaves through `sink` (called on this thread). No asyncio here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vlmserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.scheduler import Scheduler
from vlmserve.errors import ServerBusyError, VLMServeError
from vlmserve.metrics.stats import EngineStats
from vlmserve.protocol.types import EngineOutput, EngineRequest, FinishReason

logger = logging.getLogger(__name__)

OutputSink = Callable[[list[EngineOutput]], None]


class Runner(Protocol):
    """What the engine needs of a model runner (runner/model_runner.py, or a fake in tests)."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


_STOP = object()


class EngineCore:
    """Fed through `add_request`/`abort` from any thread; reports every delta through `sink`.

    An exception in the runner fails the requests of that step (with the message) and the engine
    goes on; an exception anywhere else in the loop fails every request and the engine is dead.
    """

    def __init__(self, scheduler: Scheduler, runner: Runner, *, max_model_len: int, sink: OutputSink) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = max_model_len
        self.sink = sink
        # gauges after the latest step and counters since the start; replaced whole (never mutated)
        # by the engine thread, so any thread may read it (AsyncEngine.stats())
        self.stats = EngineStats()
        self.dead_reason: str | None = None
        self._inbox: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vlmserve-engine", daemon=True)

    # --- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add_request(self, engine_request: EngineRequest) -> None:
        self._inbox.put(engine_request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Requests waiting or running (read without a lock: len() of a dict is atomic)."""
        return self.scheduler.num_unfinished_requests

    # --- the engine thread ---------------------------------------------------------------------
    def step(self) -> None:
        """One engine step: schedule -> execute -> update."""
        scheduler_output = self.scheduler.schedule()
        runner_output = self._execute(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        self._record_stats(runner_output, outputs)
        self._emit(outputs)

    def _record_stats(
        self, runner_output: ModelRunnerOutput | None = None, outputs: Sequence[EngineOutput] = ()
    ) -> None:
        # a request's first output (its first token) brings its prompt into the prompt-token count
        first = [o for o in outputs if o.new_token_ids and o.num_output_tokens == len(o.new_token_ids)]
        self.stats = self.stats.add_step(
            self.scheduler.make_stats(),
            runner_output.encoder_stats if runner_output is not None else None,
            num_prompt_tokens=sum(o.num_prompt_tokens for o in first),
            num_generation_tokens=sum(len(o.new_token_ids) for o in outputs),
        )

    def _run(self) -> None:
        try:
            while self._drain_inbox(block=self.num_unfinished == 0):
                if self.num_unfinished:
                    self.step()
                else:  # the last requests were aborted: no step will report their freed blocks
                    self._record_stats()
        except Exception as exc:  # the loop itself broke: fail everything, report dead
            logger.exception("engine loop died")
            self.dead_reason = f"engine loop died: {exc!r}"
            self._fail_all(self.dead_reason)

    def _drain_inbox(self, *, block: bool) -> bool:
        """Applies queued adds and aborts; False once shutdown was asked for."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                self._fail_all("server shutting down")
                return False
            if isinstance(item, _Abort):
                self._emit([self.scheduler.abort(item.request_id)])
            else:
                assert isinstance(item, EngineRequest)
                self._add(item)

    def _add(self, engine_request: EngineRequest) -> None:
        """Queues the request; a full queue or a request that can never fit ends it at once."""
        request = Request.from_engine_request(engine_request, max_model_len=self.max_model_len)
        try:
            self.scheduler.add_request(request)
        except ServerBusyError:
            self._emit([_final_output(request, FinishReason.ABORT, "the server is busy")])
        except (VLMServeError, ValueError) as exc:  # cannot fit the KV cache; an id already in use
            self._emit([_final_output(request, FinishReason.ERROR, str(exc))])

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self.runner.execute(scheduler_output)
        except Exception as exc:  # a bug hit by this step's requests: fail them, keep serving the rest
            request_ids = list(
                dict.fromkeys(
                    [*scheduler_output.num_scheduled_tokens, *scheduler_output.scheduled_encoder_slices]
                )
            )
            logger.exception("model execution failed for requests %s", ", ".join(request_ids))
            error = f"model execution failed: {exc!r}"
            self._emit(
                [
                    self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR, error)
                    for rid in request_ids
                ]
            )
            return ModelRunnerOutput.make_empty()

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self.scheduler.requests):
            self._emit([self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR, reason)])

    def _emit(self, outputs: Sequence[EngineOutput | None]) -> None:
        present = [output for output in outputs if output is not None]
        if present:
            self.sink(present)


def _final_output(request: Request, finish_reason: FinishReason, error: str) -> EngineOutput:
    return EngineOutput(
        request_id=request.request_id,
        new_token_ids=[],
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=0,
        finish_reason=finish_reason,
        error=error,
    )
