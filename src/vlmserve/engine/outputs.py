"""The contracts between the Scheduler and the ModelRunner: SchedulerOutput in, ModelRunnerOutput out.

Plain data (lists, dicts, ints, the request's ImageInputs), no Request objects and no tensors, so
the runner may later live in another process. The runner keeps its own per-request state (token
ids, block table, RNG) keyed by request_id: created from a NewRequestData, advanced by each step,
dropped when the id shows up in finished_request_ids or preempted_request_ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmserve.metrics.stats import EncoderStats
from vlmserve.protocol.types import ImageInput, SamplingParams, TokenLogprob


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after a preemption."""

    request_id: str
    prompt_token_ids: list[int]
    # tokens generated before a preemption (recomputed now, like the prompt); empty for a new request
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # sorted by offset; SchedulerOutput.scheduled_encoder_inputs indexes into this list
    images: list[ImageInput]
    # the whole block table: token at position p lives in slot p % block_size of block_ids[p // block_size]
    block_ids: list[int]
    # tokens whose KV is already in the blocks (prefix-cache hit, a multiple of block_size); this
    # step computes positions [num_computed_tokens, num_computed_tokens + num_scheduled_tokens)
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class RunningRequestData:
    """A request scheduled in an earlier step too; the runner holds its tokens and block table."""

    request_id: str
    # blocks to append to the request's block table (often empty: the last block has room)
    new_block_ids: list[int]
    # tokens computed before this step; for a decode this is num_tokens - 1 and the one token to
    # compute is the last token the runner sampled for the request
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class EncoderSlice:
    """Tiles [tile_start, tile_end) of one image of a request, to run through the vision encoder.

    With an encoder budget per step (SchedulerConfig.max_encoder_tiles_per_step) a large image is
    encoded over several steps, a slice per step, while other requests' decodes go on; the runner
    keeps the features until the step whose chunk covers the image's span takes them. The image is
    carried here because its request may not be scheduled (nor known to the runner) yet.
    """

    # index into the request's images (sorted by offset)
    image_index: int
    image: ImageInput
    tile_start: int
    tile_end: int


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """What one step computes: for each scheduled request, which tokens, into which blocks.

    A request gets a sampled token iff num_computed_tokens + num_scheduled_tokens reaches its
    total token count (prompt + output so far); a partial prefill chunk samples nothing.
    Each chunk holds every image it touches whole (no placeholder span is split across steps);
    an image's encoding may be spread over earlier steps (scheduled_encoder_slices).
    """

    scheduled_new_requests: list[NewRequestData]
    scheduled_running_requests: list[RunningRequestData]
    # request_id -> tokens computed this step, for every scheduled request (new and running)
    num_scheduled_tokens: dict[str, int]
    # sum of num_scheduled_tokens; at most max_num_batched_tokens unless one image alone exceeds it
    total_num_scheduled_tokens: int
    # request_id -> indices (into that request's images) whose placeholder span lies in this
    # step's chunk: run the vision encoder on these, once each
    scheduled_encoder_inputs: dict[str, list[int]]
    # requests preempted this step: drop their state (they come back later as NewRequestData)
    preempted_request_ids: list[str]
    # requests finished or aborted since the previous step: drop their state
    finished_request_ids: set[str]
    # request_id -> slices of its images to encode in this step, before the forward (only with an
    # encoder budget); the request may have no tokens in this step. An image in
    # scheduled_encoder_inputs has had all its tiles in slices by then (in this step or earlier).
    scheduled_encoder_slices: dict[str, list[EncoderSlice]] = field(default_factory=dict)

    @classmethod
    def make_empty(cls) -> SchedulerOutput:
        return cls(
            scheduled_new_requests=[],
            scheduled_running_requests=[],
            num_scheduled_tokens={},
            total_num_scheduled_tokens=0,
            scheduled_encoder_inputs={},
            preempted_request_ids=[],
            finished_request_ids=set(),
        )


@dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """What one step produced: a sampled token per request whose scheduled tokens reached its end."""

    # request_id -> the sampled token id; a token for a partial prefill chunk is ignored
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # request_id -> the sampled token's logprob (and top alternatives), for requests that asked
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # the vision encoder's work this step; None when the step had no image
    encoder_stats: EncoderStats | None = None
    # structured output: requests whose guide is complete with this step's token (nothing but eos
    # may follow: they stop here, ignore_eos or not), and requests whose guide failed (a token it
    # does not allow, a grammar too complex to go on): request_id -> why; they end with an error
    guides_finished: set[str] = field(default_factory=set)
    guide_errors: dict[str, str] = field(default_factory=dict)
    # request_id -> indices of its images the runner now holds whole (an encoder-cache hit on a
    # slice, or the last slice encoded): the scheduler skips the rest of their slices
    encoded_images: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def make_empty(cls) -> ModelRunnerOutput:
        return cls()
