"""Internal messages between the HTTP layer and the engine: plain dataclasses, no torch, no pydantic.

`EngineRequest` goes in, `EngineOutput` (token deltas) comes out. Both are plain data so that the
boundary can later become a process boundary without touching the scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal


class FinishReason(enum.Enum):
    """Why a request ended. `value` is what the OpenAI API reports (abort and error never reach it)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


GuidedDecodingKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class GuidedDecodingSpec:
    """A structured-output constraint on the generated text, as the request gave it (not yet compiled).

    kind and value: "json": the JSON schema as compact JSON text (key order kept: it is the order the
    properties are generated in); "json_object": any JSON object, value ""; "regex": the regular
    expression the whole output must match; "choice": the output is exactly one of these strings;
    "grammar": a grammar in Lark or GBNF syntax. Equal specs share one compiled guide.
    """

    kind: GuidedDecodingKind
    value: str | tuple[str, ...]
    # the request field it came from ("nvext.guided_regex", "response_format.json_schema.schema", ...):
    # the `param` of the 400 when the constraint does not compile; not part of equality
    param: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings, already validated at the HTTP edge.

    temperature == 0 means greedy. top_k == -1 means off. seed None means "not reproducible".
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # drop tokens less likely than min_p x the most likely token's probability (after temperature);
    # 0.0: off
    min_p: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None
    # stop strings: generation ends when the text contains one; it is cut before the match.
    stop: tuple[str, ...] = ()
    # extra token ids that end generation besides the tokenizer's eos ids
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely alternatives
    logprobs: int | None = None
    # (token_id, bias) pairs added to the logits before anything else (OpenAI logit_bias); the ids
    # are in the vocabulary (checked at the edge)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # structured output: the text must follow this constraint; None: unconstrained
    guided: GuidedDecodingSpec | None = None


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image of a request, preprocessed into tiles, and where its tokens sit in the prompt.

    pixel_values: torch.Tensor of shape [num_tiles, 3, tile_size, tile_size], float32 in [0, 1]
    (normalisation happens inside the vision encoder).
    """

    pixel_values: Any
    num_tiles: int
    # hex digest of the decoded pixels plus the preprocessing settings (cache key)
    content_hash: str
    # index in prompt_token_ids of the first image-context token of this image
    offset: int
    # the placeholder span [offset, offset + length): the scheduler keeps it in one prefill chunk and
    # the prefix cache keys its blocks with content_hash; = num_embeds unless embed_runs says otherwise
    length: int
    # (start relative to offset, count) of each run of positions in the span that take features, in
    # order, when the span also holds layout tokens between the runs (Idefics3's
    # `<fake_token_around_image><row_R_col_C>` tags, which keep their own embeddings); empty: every
    # position of the span takes a feature (vLLM's PlaceholderRange.is_embed, as runs)
    embed_runs: tuple[tuple[int, int], ...] = ()

    @property
    def num_embeds(self) -> int:
        """Number of image-context tokens (= num_tiles * tokens_per_tile): the encoder's feature rows."""
        return sum(count for _, count in self.embed_runs) if self.embed_runs else self.length


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request as the engine sees it: token ids, images with their positions, sampling settings."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    images: list[ImageInput] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one generated token and the top alternatives at that step."""

    token_id: int
    logprob: float
    # (token_id, logprob) pairs, most likely first
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineOutput:
    """A delta for one request: the token ids generated since the last output.

    finish_reason is set on the last output of a request; error carries the message when
    finish_reason is ERROR.
    """

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    # decoded text of new_token_ids (filled by the AsyncEngine's detokenizer; never a broken UTF-8 char)
    text: str = ""
    finish_reason: FinishReason | None = None
    # the stop string or stop token id that ended the request, if one did
    stop_reason: str | int | None = None
    error: str | None = None
    # one entry per new token when the request asked for logprobs, else empty
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text part of a message's content."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image part: `url` is a data URL or an http(s) URL; detail is "auto", "low" or "high"."""

    url: str
    detail: str = "auto"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A validated chat message. String content of user messages may still hold <img src> tags;
    the input preprocessor parses them (never inside TextPart)."""

    role: str
    content: str | list[TextPart | ImagePart] | None
