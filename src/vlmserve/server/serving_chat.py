"""Chat completions: ChatCompletionRequest -> EngineRequest(s) -> engine deltas -> response or SSE chunks.

`start()` checks the request (model, supported fields, context length), preprocesses the messages,
submits one engine request per choice and waits for the first delta, so that a busy or dead engine
still gets its own status code before any header goes out. `collect()` builds the JSON response,
`stream()` the event stream. Whatever ends a run (completion, error, disconnect, cancellation),
`ChatRun.close()` aborts the engine requests that are still going. No HTTP objects are touched here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import anyio

from vlmserve.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestFailedError,
    ServerBusyError,
)
from vlmserve.inputs.assets import parse_asset_references
from vlmserve.logs import name_request
from vlmserve.protocol.openai import (
    DEFAULT_MAX_TOKENS,
    INT64_MAX,
    INT64_MIN,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionTokenLogprob,
    ChatMessageResponse,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from vlmserve.protocol.types import EngineOutput, EngineRequest, FinishReason, SamplingParams, TokenLogprob
from vlmserve.runner.structured_output import validate_spec
from vlmserve.server.errors import error_payload
from vlmserve.server.sse import DONE_EVENT, error_event, format_event

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer
    from vlmserve.engine.async_engine import AsyncEngine
    from vlmserve.inputs.preprocess import PreparedPrompt

logger = logging.getLogger(__name__)

OpenAIFinishReason = Literal["stop", "length"]
# JSON has no -inf; vLLM reports such logprobs as -9999.0 too
MIN_LOGPROB = -9999.0
# a logged prompt (--no-disable-log-requests) is cut to this many characters
MAX_LOGGED_PROMPT_CHARS = 2000
_IMAGE_SENTINEL = re.compile(r"<\|vlmserve-image-[0-9a-f]+\|>")
_DATA_URL = re.compile(r"data:[^,\s\"']{0,100},[A-Za-z0-9+/=_-]*")


class EngineStreams:
    """The deltas of a run's engine requests, merged into one stream of (choice index, EngineOutput).

    One task per engine request pumps its deltas into a queue, so n choices run concurrently.
    `close()` is idempotent and must run however the run ends: it stops the pumps and aborts every
    engine request that has not finished.
    """

    def __init__(self, engine: AsyncEngine, requests: list[EngineRequest]) -> None:
        self._engine = engine
        self._request_ids = [request.request_id for request in requests]
        self._unfinished = set(self._request_ids)
        self._queue: asyncio.Queue[tuple[int, EngineOutput | Exception | None]] = asyncio.Queue()
        self._num_open = len(requests)
        self._pushed_back: list[tuple[int, EngineOutput]] = []
        self._tasks = [asyncio.create_task(self._pump(i, request)) for i, request in enumerate(requests)]

    async def _pump(self, index: int, request: EngineRequest) -> None:
        try:
            outputs: Any = self._engine.generate(request)
            if inspect.isawaitable(outputs):
                outputs = await outputs
            async for output in outputs:
                self._queue.put_nowait((index, output))
            self._queue.put_nowait((index, None))
        except Exception as exc:
            self._queue.put_nowait((index, exc))

    async def next(self) -> tuple[int, EngineOutput] | None:
        """The next delta of any choice, or None once every engine request has ended."""
        if self._pushed_back:
            return self._pushed_back.pop()
        while self._num_open:
            index, item = await self._queue.get()
            # an engine request is over once it finished, ended its stream, or raised
            if item is None or isinstance(item, Exception) or item.finished:
                self._unfinished.discard(self._request_ids[index])
            if item is None:
                self._num_open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            return index, item
        return None

    def push_back(self, item: tuple[int, EngineOutput]) -> None:
        self._pushed_back.append(item)

    async def close(self) -> None:
        # shielded: this runs in `finally` blocks of cancelled tasks and must still reach the engine
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            unfinished, self._unfinished = sorted(self._unfinished), set()
            for request_id in unfinished:
                logger.info("%s: aborting", request_id)
                try:
                    await self._engine.abort(request_id)
                except Exception:
                    logger.exception("%s: abort failed", request_id)


@dataclass(slots=True)
class ChatRun:
    """A chat request whose engine requests are running; `outputs` yields their deltas."""

    request_id: str
    created: int
    model: str
    request: ChatCompletionRequest
    num_prompt_tokens: int
    outputs: EngineStreams
    # per choice: generated tokens so far (sum of the deltas' new_token_ids)
    num_output_tokens: list[int] = field(default_factory=list)

    def usage(self) -> UsageInfo:
        completion_tokens = sum(self.num_output_tokens)
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            total_tokens=self.num_prompt_tokens + completion_tokens,
            completion_tokens=completion_tokens,
        )


class ChatCompletionService:
    """Serves /v1/chat/completions against one loaded ModelServer."""

    def __init__(self, model_server: ModelServer, *, log_prompts: bool = False) -> None:
        """log_prompts: log each request's prompt text (images never) at INFO; off by default."""
        self.model_server = model_server
        self.log_prompts = log_prompts
        self._token_texts: dict[int, str] = {}

    async def start(self, request: ChatCompletionRequest, *, asset_references: str | None = None) -> ChatRun:
        """Check, preprocess and submit `request`; return once its first delta is there.

        asset_references: the request's NVCF-INPUT-ASSET-REFERENCES header (the asset ids its images
        may use), or None.
        """
        server = self.model_server
        prompt, params = await self.prepare(request, asset_references=asset_references)
        num_prompt_tokens = len(prompt.prompt_token_ids)
        request_id = f"chat-{uuid.uuid4().hex}"
        name_request(request_id)
        engine_requests = _engine_requests(request_id, prompt, params, request.num_choices)
        logger.info(
            "%s: %d prompt tokens, %d images, n=%d, max_tokens=%d, stream=%s",
            request_id,
            num_prompt_tokens,
            len(prompt.images),
            request.num_choices,
            params.max_tokens,
            bool(request.stream),
        )
        if self.log_prompts:
            logger.info("%s: prompt: %s", request_id, loggable_prompt(prompt.prompt_text))
        run = ChatRun(
            request_id=request_id,
            created=int(time.time()),
            model=server.served_model_name,
            request=request,
            num_prompt_tokens=num_prompt_tokens,
            outputs=EngineStreams(server.engine, engine_requests),
            num_output_tokens=[0] * request.num_choices,
        )
        try:
            first = await run.outputs.next()
        except BaseException:
            await run.outputs.close()
            raise
        if first is not None:
            run.outputs.push_back(first)
        return run

    async def prepare(
        self, request: ChatCompletionRequest, *, asset_references: str | None = None
    ) -> tuple[PreparedPrompt, SamplingParams]:
        """Every check of a chat request and its prompt and sampling settings, nothing submitted:
        start() runs it, and so does /v1/chat/completions/render (same rules, same prompt)."""
        server = self.model_server
        if request.model is not None and request.model != server.served_model_name:
            raise ModelNotFoundError(f"The model `{request.model}` does not exist.", param="model")
        request.check_supported()
        # max_tokens is set once the prompt's length is known
        params = request.to_sampling_params()
        _check_logit_bias_ids(params.logit_bias, server.tokenizer_info.vocab_size)
        if params.guided is not None:
            # compiles the schema/regex/grammar (milliseconds; more for huge ones: off the event
            # loop); a 400 naming the problem if it does not, else the engine gets it from the cache
            await asyncio.to_thread(validate_spec, params.guided, server.tokenizer_info)
        asset_ids = parse_asset_references(asset_references)
        if not server.engine.is_running:
            raise EngineDeadError("the engine has stopped after an error; the server needs a restart")
        prompt = await server.preprocessor.prepare(
            request.to_chat_messages(), completion_mode=request.is_completion_mode, asset_ids=asset_ids
        )
        params = replace(params, max_tokens=self._max_tokens(request, len(prompt.prompt_token_ids)))
        return prompt, params

    def _max_tokens(self, request: ChatCompletionRequest, num_prompt_tokens: int) -> int:
        """The request's max_tokens, checked against the context; else the default that still fits."""
        max_model_len = self.model_server.max_model_len
        requested = request.requested_max_tokens
        if requested is not None:
            if num_prompt_tokens + requested > max_model_len:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {max_model_len} tokens, but the request needs "
                    f"{num_prompt_tokens + requested}: {num_prompt_tokens} in the messages (images included) "
                    f"and {requested} in max_tokens. Shorten the messages, send fewer or smaller images, "
                    "or lower max_tokens.",
                    param="messages",
                )
            return requested
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens, but the messages alone are "
                f"{num_prompt_tokens} tokens (images included), leaving no room to generate. Shorten the "
                "messages or send fewer or smaller images.",
                param="messages",
            )
        return min(DEFAULT_MAX_TOKENS, room)

    async def collect(self, run: ChatRun) -> ChatCompletionResponse:
        """Run to completion and build the non-streaming response."""
        num_choices = run.request.num_choices
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        logprobs: list[list[ChatCompletionTokenLogprob]] = [[] for _ in range(num_choices)]
        finals: list[EngineOutput | None] = [None] * num_choices
        try:
            while (item := await run.outputs.next()) is not None:
                index, output = item
                run.num_output_tokens[index] += len(output.new_token_ids)
                texts[index].append(output.text)
                logprobs[index].extend(self._logprobs(run, output.logprobs))
                if output.finished:
                    finals[index] = output
        finally:
            await run.outputs.close()
        choices = [
            ChatCompletionResponseChoice(
                index=index,
                message=ChatMessageResponse(content="".join(texts[index])),
                logprobs=ChoiceLogprobs(content=logprobs[index]) if run.request.logprobs else None,
                finish_reason=_finish_reason(finals[index]),
                stop_reason=_stop_reason(finals[index]),
            )
            for index in range(num_choices)
        ]
        return ChatCompletionResponse(
            id=run.request_id, created=run.created, model=run.model, choices=choices, usage=run.usage()
        )

    async def stream(self, run: ChatRun) -> AsyncGenerator[str, None]:
        """The SSE events of `run`; an error after the first event becomes one error event, then [DONE]."""
        try:
            async for chunk in self._chunks(run):
                yield format_event(chunk)
        except Exception as exc:
            status, body = error_payload(exc)
            logger.warning(
                "%s: stream ended with error %d: %s", run.request_id, status, body["error"]["message"]
            )
            yield error_event(body)
        finally:
            await run.outputs.close()
        yield DONE_EVENT

    async def _chunks(self, run: ChatRun) -> AsyncIterator[ChatCompletionChunk]:
        for index in range(run.request.num_choices):
            yield self._chunk(
                run, ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            )
        while (item := await run.outputs.next()) is not None:
            index, output = item
            run.num_output_tokens[index] += len(output.new_token_ids)
            if output.text or output.logprobs:
                logprobs = (
                    ChoiceLogprobs(content=self._logprobs(run, output.logprobs))
                    if run.request.logprobs
                    else None
                )
                choice = ChatCompletionStreamChoice(
                    index=index,
                    delta=DeltaMessage(content=output.text),
                    logprobs=logprobs,
                    finish_reason=None,
                )
                yield self._chunk(run, choice)
            if output.finished:
                yield self._chunk(
                    run,
                    ChatCompletionStreamChoice(
                        index=index,
                        delta=DeltaMessage(),
                        logprobs=None,
                        finish_reason=_finish_reason(output),
                        stop_reason=output.stop_reason,
                    ),
                )
        if run.request.include_usage:
            yield ChatCompletionChunk(
                id=run.request_id, created=run.created, model=run.model, choices=[], usage=run.usage()
            )

    @staticmethod
    def _chunk(run: ChatRun, choice: ChatCompletionStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=run.request_id, created=run.created, model=run.model, choices=[choice])

    def _logprobs(self, run: ChatRun, entries: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
        if not run.request.logprobs:
            return []
        num_top = run.request.top_logprobs or 0
        result = []
        for entry in entries:
            token = self._token_text(entry.token_id)
            top = [
                TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))
                for token_id, logprob in entry.top[:num_top]
                for text in (self._token_text(token_id),)
            ]
            result.append(
                ChatCompletionTokenLogprob(
                    token=token,
                    logprob=max(entry.logprob, MIN_LOGPROB),
                    bytes=list(token.encode()),
                    top_logprobs=top,
                )
            )
        return result

    def _token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI reports it: decoded ("▁the"/"Ġthe" become " the")."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.model_server.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text


def loggable_prompt(prompt_text: str) -> str:
    """The prompt as it may be logged: images as <image>, data URLs without their data, cut short."""
    text = _IMAGE_SENTINEL.sub("<image>", prompt_text)
    text = _DATA_URL.sub(lambda match: match.group(0).partition(",")[0] + ",<data>", text)
    if len(text) > MAX_LOGGED_PROMPT_CHARS:
        text = f"{text[:MAX_LOGGED_PROMPT_CHARS]}... ({len(text)} characters)"
    return repr(text)


def _finish_reason(output: EngineOutput | None) -> OpenAIFinishReason | None:
    if output is None or output.finish_reason is None:
        return None
    if output.finish_reason is FinishReason.ERROR:
        raise RequestFailedError(output.error or "the engine failed this request")
    if output.finish_reason is FinishReason.ABORT:
        raise ServerBusyError("the server aborted this request (it may be shutting down)")
    return "length" if output.finish_reason is FinishReason.LENGTH else "stop"


def _engine_requests(
    request_id: str, prompt: PreparedPrompt, params: SamplingParams, n: int
) -> list[EngineRequest]:
    """One engine request per choice: ids `<id>-<i>` when n > 1, seeds seed + i when seeded."""
    return [
        EngineRequest(
            request_id=request_id if n == 1 else f"{request_id}-{i}",
            prompt_token_ids=list(prompt.prompt_token_ids),
            sampling_params=params if params.seed is None else _with_seed(params, params.seed + i),
            images=list(prompt.images),
        )
        for i in range(n)
    ]


def _stop_reason(output: EngineOutput | None) -> str | int | None:
    return None if output is None else output.stop_reason


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """`params` with `seed`, wrapped into the int64 range (choice i of a seeded request uses seed + i)."""
    wrapped = (seed - INT64_MIN) % (INT64_MAX - INT64_MIN + 1) + INT64_MIN
    return replace(params, seed=wrapped)


def _check_logit_bias_ids(logit_bias: tuple[tuple[int, float], ...], vocab_size: int) -> None:
    for token_id, _ in logit_bias:
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"logit_bias: token id {token_id} is outside the vocabulary (ids 0 to {vocab_size - 1})",
                param="logit_bias",
            )
