"""Pydantic models of the HTTP API: /v1/chat/completions, /v1/models and the error body.

This is the only place pydantic appears. Requests are checked here (ranges, types, role order: 422)
and turned into the internal types of `protocol/types.py` by `to_sampling_params()` and
`to_chat_messages()`. Fields the engine cannot honour are refused by `check_supported()` (400), never
accepted as if they worked. Unknown fields are ignored and logged at debug, as vLLM does.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.guided import guided_spec
from vlmserve.protocol.types import ChatMessage, ImagePart, SamplingParams, TextPart

logger = logging.getLogger(__name__)

MAX_MESSAGES = 1024
MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_TOKENS = 1024
MAX_TOP_LOGPROBS = 20
# Each of the n choices is one engine request; 16 keeps one HTTP request from filling the queue alone.
MAX_N = 16
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Tags of the tagged unions below. They are not Python identifiers, so server/errors.py can drop them
# from an error's location ("messages.0.content.1.image_url.detail", not "...content:parts.1.part:...").
CONTENT_STR_TAG = "content:str"
CONTENT_PARTS_TAG = "content:parts"
PART_TEXT_TAG = "part:text"
PART_IMAGE_TAG = "part:image_url"


class OpenAIBaseModel(BaseModel):
    """Base of the request models: unknown fields are ignored and logged at debug; no NaN or infinity."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(key) for key in data if key not in cls.model_fields)
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, ", ".join(unknown))
        return data


# ---------------------------------------------------------------------------------------------------
# Request: messages
# ---------------------------------------------------------------------------------------------------


class ImageURL(OpenAIBaseModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageContentPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": PART_TEXT_TAG, "image_url": PART_IMAGE_TAG}.get(kind) if isinstance(kind, str) else None


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return CONTENT_STR_TAG
    if isinstance(value, list):
        return CONTENT_PARTS_TAG
    return None


ContentPart = Annotated[
    Annotated[TextContentPart, Tag(PART_TEXT_TAG)] | Annotated[ImageContentPart, Tag(PART_IMAGE_TAG)],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part must have type 'text' or 'image_url'",
    ),
]

MessageContent = Annotated[
    Annotated[str, Tag(CONTENT_STR_TAG)] | Annotated[list[ContentPart], Tag(CONTENT_PARTS_TAG)],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class ChatCompletionMessageParam(OpenAIBaseModel):
    """One request message. Rules that depend on the message's position live on the request."""

    role: Literal["system", "user", "assistant"]
    content: MessageContent | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _list_content_only_for_user(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if isinstance(content, list) and role is not None and role != "user":
            raise ValueError(f"the list form of content is allowed only for user messages, not {role}")
        return content

    @property
    def is_empty(self) -> bool:
        return self.content is None or len(self.content) == 0


# ---------------------------------------------------------------------------------------------------
# Request: options
# ---------------------------------------------------------------------------------------------------


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class NVExt(OpenAIBaseModel):
    """NIM's extension object `nvext`."""

    top_k: int = -1
    # drop tokens less likely than min_p x the most likely token's probability (vLLM's min_p; 0: off)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k_off_or_positive(cls, top_k: int) -> int:
        if top_k != -1 and top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {top_k}")
        return top_k


class ChatCompletionRequest(OpenAIBaseModel):
    """POST /v1/chat/completions. A null scalar means "the default", as an absent one does."""

    # Ordered by the official OpenAI API reference.
    messages: list[ChatCompletionMessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    # None: the served model (the hosted NIM API defaults it too)
    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # max_completion_tokens is the newer OpenAI name of max_tokens; when both are given it wins
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0, le=1)
    top_p: float | None = Field(0.01, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    # --- Extensions: NVIDIA NIM fields that are not in the OpenAI API ------------------------------
    nvext: NVExt | None = None

    @field_validator("messages")
    @classmethod
    def _check_role_order(
        cls, messages: list[ChatCompletionMessageParam]
    ) -> list[ChatCompletionMessageParam]:
        start = 1 if messages and messages[0].role == "system" else 0
        for index, message in enumerate(messages):
            if index < start:
                continue
            expected = "user" if (index - start) % 2 == 0 else "assistant"
            if message.role != expected:
                raise ValueError(_role_order_message(index, message.role, expected, start))
        last = len(messages) - 1
        if messages[last].role not in ("user", "assistant"):
            raise ValueError(f"messages.{last}.role: the last message must be user or assistant, not system")
        for index, message in enumerate(messages):
            if message.is_empty and not (index == last and message.role == "assistant"):
                raise ValueError(
                    f"messages.{index}.content: content may be null or empty only in a final assistant "
                    "message (completion mode)"
                )
        return messages

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        return self

    @property
    def is_completion_mode(self) -> bool:
        """A final assistant message: the model continues its content."""
        return self.messages[-1].role == "assistant"

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Raise InvalidRequestError (400) for fields this server parses but cannot honour."""
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            param = "tools" if self.tools else "tool_choice"
            raise InvalidRequestError("tool calling is not offered for this model", param=param)
        self.logit_bias_pairs()
        # structured output: well-formed and at most one constraint (whether it compiles is checked
        # against the tokenizer by runner/structured_output.validate_spec, still before the engine)
        guided_spec(self.response_format, self.nvext)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token_id, bias) pairs sorted by id. InvalidRequestError (400) for a key that is
        not a token id or a bias outside [-100, 100] (OpenAI's range); whether an id is in the
        vocabulary is checked where the tokenizer is known."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise InvalidRequestError(
                    f"logit_bias: key {key[:40]!r} is not a token id (a non-negative integer as a string)",
                    param="logit_bias",
                )
            if not -100 <= bias <= 100:
                raise InvalidRequestError(
                    f"logit_bias: the bias of token {key.strip()} is {bias}, outside [-100, 100]",
                    param="logit_bias",
                )
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    def to_sampling_params(self, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
        """The engine's sampling settings; `default_max_tokens` applies when the request names none."""
        nvext = self.nvext or NVExt()
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=0.01 if self.top_p is None else self.top_p,
            top_k=nvext.top_k,
            max_tokens=self.requested_max_tokens or default_max_tokens,
            seed=self.seed,
            # an empty stop string would end every request at once; it carries no meaning, so drop it
            stop=tuple(s for s in stop if s),
            ignore_eos=nvext.ignore_eos,
            repetition_penalty=nvext.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            min_p=nvext.min_p,
            logit_bias=self.logit_bias_pairs(),
            guided=guided_spec(self.response_format, self.nvext),
        )

    def to_chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(role=m.role, content=_convert_content(m.content)) for m in self.messages]


def _role_order_message(index: int, role: str, expected: str, start: int) -> str:
    if role == "system":
        return f"messages.{index}.role: a system message is allowed only as the first message"
    if index == start:
        return (
            f"messages.{index}.role: the first message after the optional system message must be user, "
            f"not {role}"
        )
    return (
        f"messages.{index}.role: must be {expected}, not {role}: user and assistant messages must alternate"
    )


def _convert_content(
    content: str | list[TextContentPart | ImageContentPart] | None,
) -> str | list[TextPart | ImagePart] | None:
    if content is None or isinstance(content, str):
        return content
    return [
        TextPart(text=part.text)
        if isinstance(part, TextContentPart)
        else ImagePart(url=part.image_url.url, detail=part.image_url.detail)
        for part in content
    ]


# ---------------------------------------------------------------------------------------------------
# Response
# ---------------------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatMessageResponse(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessageResponse
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # the stop string or stop token id that ended generation, else null
    stop_reason: str | int | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: None = None


class DeltaMessage(BaseModel):
    """A streamed delta: only the fields it carries are serialised (the last chunk's delta is {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event. `usage` appears only on the final usage chunk (stream_options.include_usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None

    @model_serializer(mode="wrap")
    def _drop_null_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ModelPermission(BaseModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "system"
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[ModelPermission]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    object: str
    message: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    # the HTTP status code, as NIM and vLLM report it
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------------------------
# Image assets: POST/GET/DELETE /v1/assets
# ---------------------------------------------------------------------------------------------------


class AssetObject(BaseModel):
    """An uploaded image asset; times are seconds since the epoch."""

    id: str
    object: Literal["asset"] = "asset"
    bytes: int
    # image/png or image/jpeg, from the bytes (not from what the client declared)
    content_type: str
    created_at: int
    expires_at: int


class AssetDeleted(BaseModel):
    id: str
    object: Literal["asset"] = "asset"
    deleted: bool = True


# ---------------------------------------------------------------------------------------------------
# Tokenize, detokenize (vLLM's shapes) and render
# ---------------------------------------------------------------------------------------------------

TOKENIZE_PROMPT_TAG = "tokenize:prompt"
TOKENIZE_MESSAGES_TAG = "tokenize:messages"


class TokenizeCompletionRequest(OpenAIBaseModel):
    """POST /tokenize with a plain prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    """POST /tokenize with chat messages: the same messages, rules and image handling as chat
    completions. A final assistant message is continued, as in chat completions."""

    model: str | None = None
    messages: list[ChatCompletionMessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # accepted for vLLM compatibility; the chat template writes the special tokens itself
    add_special_tokens: bool = False
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _check_role_order(
        cls, messages: list[ChatCompletionMessageParam]
    ) -> list[ChatCompletionMessageParam]:
        return ChatCompletionRequest._check_role_order(messages)

    @model_validator(mode="after")
    def _one_way_to_end(self) -> TokenizeChatRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message: cannot be true together with add_generation_prompt; "
                "set add_generation_prompt to false to continue the final assistant message"
            )
        return self

    @property
    def is_completion_mode(self) -> bool:
        return self.messages[-1].role == "assistant"

    def to_chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(role=m.role, content=_convert_content(m.content)) for m in self.messages]


def _tokenize_tag(value: Any) -> str:
    return TOKENIZE_MESSAGES_TAG if isinstance(value, dict) and "messages" in value else TOKENIZE_PROMPT_TAG


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag(TOKENIZE_PROMPT_TAG)]
    | Annotated[TokenizeChatRequest, Tag(TOKENIZE_MESSAGES_TAG)],
    Discriminator(_tokenize_tag),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None

    @model_serializer(mode="wrap")
    def _drop_null_token_strs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("token_strs") is None:
            data.pop("token_strs", None)
        return data


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class RenderedImage(BaseModel):
    """One image of a rendered prompt: its tiles and the prompt tokens it takes, markers included."""

    num_tiles: int
    num_tokens: int


class RenderResponse(BaseModel):
    """POST /v1/chat/completions/render: the prompt a chat request would run, without running it."""

    # the prompt text the model sees, each image's tokens written out (<img><image>...</img>)
    prompt: str
    prompt_token_ids: list[int]
    # = usage.prompt_tokens of the same chat request
    num_prompt_tokens: int
    num_image_tokens: int
    images: list[RenderedImage]
