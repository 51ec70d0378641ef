"""The engine loop: one thread that owns the requests and the model runner.

`step()` is schedule -> execute -> update. This version runs one request at a time, first come
first served, a token per step (the first step of a request computes its whole prompt); the
continuous-batching scheduler replaces `_schedule` and `ModelRunner.execute` behind the same
inputs (EngineRequest, abort) and outputs (EngineOutput). No asyncio here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vlmserve.engine.request import Request, RequestStatus
from vlmserve.protocol.types import EngineOutput, EngineRequest, FinishReason
from vlmserve.runner.model_runner import ModelRunner
from vlmserve.runner.sampler import SampleResult, make_generator

logger = logging.getLogger(__name__)

OutputSink = Callable[[list[EngineOutput]], None]


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


_STOP = object()


class EngineCore:
    """Owns the waiting queue and the running request; fed through `add_request`/`abort` from any
    thread, it reports every delta through `sink` (called on the engine thread)."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        eos_token_ids: set[int],
        max_model_len: int,
        sink: OutputSink,
    ) -> None:
        self.runner = runner
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.sink = sink
        self._inbox: queue.Queue[object] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.running: Request | None = None
        self.dead_reason: str | None = None
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
        return len(self.waiting) + (self.running is not None)

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain_inbox(block=self.num_unfinished == 0):
                if self.num_unfinished:
                    self.step()
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
                self._abort(item.request_id)
            else:
                assert isinstance(item, EngineRequest)
                self.waiting.append(self._new_request(item))

    def step(self) -> None:
        """One engine step: schedule -> execute -> update."""
        request = self._schedule()
        try:
            result = self.runner.execute(request)
        except Exception as exc:  # a bug hit by this request: fail it, keep serving the others
            logger.exception("request %s failed in the model runner", request.request_id)
            self._finish(request, RequestStatus.FINISHED_ERROR, error=f"model execution failed: {exc!r}")
            return
        self._update(request, result)

    def _schedule(self) -> Request:
        if self.running is None:
            self.running = self.waiting.popleft()
            self.running.status = RequestStatus.RUNNING
        return self.running

    def _update(self, request: Request, result: SampleResult) -> None:
        request.output_token_ids.append(result.token_id)
        status = self._check_stop(request, result.token_id)
        output = self._output(request, [result.token_id])
        if result.logprob is not None:
            output.logprobs.append(result.logprob)
        if status is not None:
            request.status = status
            self._release(request)
            output.finish_reason = request.finish_reason
            output.stop_reason = request.stop_reason
        self.sink([output])

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.engine_request.sampling_params
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= request.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # --- bookkeeping ---------------------------------------------------------------------------
    def _new_request(self, engine_request: EngineRequest) -> Request:
        params = engine_request.sampling_params
        num_prompt = len(engine_request.prompt_token_ids)
        return Request(
            request_id=engine_request.request_id,
            prompt_token_ids=list(engine_request.prompt_token_ids),
            engine_request=engine_request,
            max_num_tokens=min(self.max_model_len, num_prompt + params.max_tokens),
            generator=make_generator(params.seed, self.runner.device),
        )

    def _abort(self, request_id: str) -> None:
        if self.running is not None and self.running.request_id == request_id:
            self._finish(self.running, RequestStatus.FINISHED_ABORTED)
            return
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.status = RequestStatus.FINISHED_ABORTED
                self.sink([self._final_output(request)])
                return

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        request.status = status
        self._release(request)
        self.sink([self._final_output(request, error)])

    def _release(self, request: Request) -> None:
        self.runner.free(request)
        if self.running is request:
            self.running = None

    def _fail_all(self, reason: str) -> None:
        requests = list(self.waiting) + ([self.running] if self.running else [])
        self.waiting.clear()
        for request in requests:
            self._finish(request, RequestStatus.FINISHED_ERROR, error=reason)

    @staticmethod
    def _output(request: Request, new_token_ids: list[int]) -> EngineOutput:
        return EngineOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
        )

    def _final_output(self, request: Request, error: str | None = None) -> EngineOutput:
        output = self._output(request, [])
        output.finish_reason = request.finish_reason or FinishReason.ABORT
        output.error = error
        return output
