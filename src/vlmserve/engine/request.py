"""Request state inside the engine: token ids, progress, status, images and prefix-cache bookkeeping.

Owned by the engine thread only; the HTTP side never sees it (it gets EngineOutputs). Pure Python:
the runner keeps the tensors and the RNG of a request on its side, keyed by request_id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vlmserve.protocol.types import EngineRequest, FinishReason, ImageInput


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(slots=True)
class Request:
    """One request's progress: prompt tokens, generated tokens, how much KV is computed.

    Invariant kept by the Scheduler: `num_computed_tokens` never lies strictly inside an image's
    placeholder span, so every chunk holds each image it touches whole.
    """

    request_id: str
    prompt_token_ids: list[int]
    engine_request: EngineRequest
    # the most tokens (prompt + output) this request may reach: min(max_model_len, prompt + max_tokens)
    max_num_tokens: int
    # the request's images sorted by offset (a chunk's encoder inputs are indices into this tuple)
    images: tuple[ImageInput, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    # tokens whose KV is computed, or scheduled in the step under way (the Scheduler counts a
    # step's tokens when it schedules them)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # set by Scheduler.add_request; a larger index arrived later (preemption takes the largest first)
    arrival_index: int = -1
    # chained hashes of the request's full blocks so far (prompt and output), filled by KVCacheManager
    block_hashes: list[bytes] = field(default_factory=list)
    # prompt tokens served from the prefix cache at first admission; -1 until admitted
    num_cached_tokens: int = -1
    # times this request was preempted (its KV freed and recomputed later)
    num_preemptions: int = 0
    # image index -> tiles scheduled for the vision encoder so far (with an encoder budget); reset
    # by preemption (the runner drops the features it held)
    num_encoded_tiles: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_engine_request(cls, engine_request: EngineRequest, *, max_model_len: int) -> Request:
        num_prompt = len(engine_request.prompt_token_ids)
        return cls(
            request_id=engine_request.request_id,
            prompt_token_ids=list(engine_request.prompt_token_ids),
            engine_request=engine_request,
            max_num_tokens=min(max_model_len, num_prompt + engine_request.sampling_params.max_tokens),
            images=tuple(sorted(engine_request.images, key=lambda image: image.offset)),
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)
