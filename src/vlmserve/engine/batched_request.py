"""`Request` plus the fields continuous batching needs (arrival order, block hashes, preemptions).

A stopgap subclass so that the scheduler and the KV-cache manager can land without editing
request.py; the fields below are meant to move into `Request` itself, and this module to go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.request import Request
from vlmserve.protocol.types import EngineRequest, ImageInput


@dataclass(slots=True)
class BatchedRequest(Request):
    """A Request as the Scheduler and KVCacheManager see it.

    Invariant kept by the Scheduler: `num_computed_tokens` never lies strictly inside an image's
    placeholder span, so every chunk holds each image it touches whole.
    """

    # the request's images sorted by offset (a chunk's encoder inputs are indices into this tuple)
    images: tuple[ImageInput, ...] = ()
    # set by Scheduler.add_request; a larger index arrived later (preemption takes the largest first)
    arrival_index: int = -1
    # chained hashes of the request's full blocks so far (prompt and output), filled by KVCacheManager
    block_hashes: list[bytes] = field(default_factory=list)
    # prompt tokens served from the prefix cache at first admission; -1 until admitted
    num_cached_tokens: int = -1
    # times this request was preempted (its KV freed and recomputed later)
    num_preemptions: int = 0

    @classmethod
    def from_engine_request(
        cls, engine_request: EngineRequest, *, max_model_len: int, generator: Any = None
    ) -> BatchedRequest:
        """The engine's Request for `engine_request`; `generator` is the runner's seeded RNG."""
        num_prompt = len(engine_request.prompt_token_ids)
        return cls(
            request_id=engine_request.request_id,
            prompt_token_ids=list(engine_request.prompt_token_ids),
            engine_request=engine_request,
            max_num_tokens=min(max_model_len, num_prompt + engine_request.sampling_params.max_tokens),
            generator=generator,
            images=tuple(sorted(engine_request.images, key=lambda image: image.offset)),
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
