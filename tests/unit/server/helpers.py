"""Test doubles and helpers for the HTTP layer: a scripted engine, a counting preprocessor, a model server.

The engine yields one fixed token delta per step ("Hello", ",", " world", "!"), honours max_tokens
(LENGTH), a stop string equal to one of its pieces (STOP with stop_reason) and logprobs; knobs make
it slow, endless, busy, failing or dead. Real engines and models are tested elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from vlmserve.errors import ImageLoadError
from vlmserve.protocol.types import (
    ChatMessage,
    EngineOutput,
    EngineRequest,
    FinishReason,
    ImagePart,
    TokenLogprob,
)
from vlmserve.runner.structured_output import TokenizerInfo, build_tokenizer_info

MODEL = "test/tiny-vlm"
PIECES = ["Hello", ",", " world", "!"]
FIRST_TOKEN_ID = 100
IMAGE_TOKENS = 10


@functools.cache
def byte_tokenizer_info() -> TokenizerInfo:
    """A real TokenizerInfo over a byte-level tokenizer of 256 byte tokens + eos (id 256), built in
    memory: structured-output specs really compile against it (the 400s are the real ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    return build_tokenizer_info(tokenizer, [vocab["</s>"]])


class FakeTokenizer:
    def decode(self, token_ids: list[int]) -> str:
        return "".join(f"t{token_id}" for token_id in token_ids)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [f"t{token_id}" for token_id in token_ids]


@dataclass
class FakeEngine:
    pieces: list[str] = field(default_factory=lambda: list(PIECES))
    # seconds between deltas
    delay: float = 0.0
    # generate forever (until aborted or cancelled)
    endless: bool = False
    # raised when generation starts (ServerBusyError, EngineDeadError, ...)
    fail_at_start: Exception | None = None
    # after this many deltas: raise fail_mid_stream (or end with FinishReason.ERROR if None)
    fail_after: int | None = None
    fail_mid_stream: Exception | None = None
    running: bool = True
    requests: list[EngineRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    # request ids whose generators were closed before finishing
    closed_early: list[str] = field(default_factory=list)

    @property
    def is_running(self) -> bool:
        return self.running

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        if self.fail_at_start is not None:
            raise self.fail_at_start
        finished = False
        try:
            async for output in self._outputs(request):
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.closed_early.append(request.request_id)

    async def _outputs(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        params = request.sampling_params
        step = 0
        while True:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_after is not None and step == self.fail_after:
                if self.fail_mid_stream is not None:
                    raise self.fail_mid_stream
                yield self._output(request, step, "", FinishReason.ERROR, error="scripted failure")
                return
            text = self.pieces[step % len(self.pieces)]
            if text in params.stop:
                yield self._output(request, step, "", FinishReason.STOP, stop_reason=text, num_tokens=0)
                return
            is_last = not self.endless and (step + 1 >= len(self.pieces) or step + 1 >= params.max_tokens)
            reason = None
            if is_last:
                reason = FinishReason.LENGTH if step + 1 >= params.max_tokens else FinishReason.STOP
            yield self._output(request, step, text, reason)
            if is_last:
                return
            step += 1

    @staticmethod
    def _output(
        request: EngineRequest,
        step: int,
        text: str,
        reason: FinishReason | None,
        *,
        stop_reason: str | None = None,
        error: str | None = None,
        num_tokens: int = 1,
    ) -> EngineOutput:
        token_ids = [FIRST_TOKEN_ID + step] * num_tokens
        logprobs = []
        if request.sampling_params.logprobs is not None and num_tokens:
            top = tuple(
                (FIRST_TOKEN_ID + step + k, -0.5 - k) for k in range(request.sampling_params.logprobs)
            )
            logprobs = [TokenLogprob(token_id=token_ids[0], logprob=-0.5, top=top)]
        return EngineOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=step + num_tokens,
            text=text,
            finish_reason=reason,
            stop_reason=stop_reason,
            error=error,
            logprobs=logprobs,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@dataclass
class FakePrompt:
    prompt_token_ids: list[int]
    images: list[Any]
    prompt_text: str


@dataclass
class FakePreprocessor:
    """One token per whitespace-separated word, IMAGE_TOKENS per image; url "bad" fails to load."""

    calls: list[tuple[list[ChatMessage], bool]] = field(default_factory=list)

    async def prepare(
        self, messages: list[ChatMessage], *, completion_mode: bool, asset_ids: frozenset[str] = frozenset()
    ) -> FakePrompt:
        self.calls.append((messages, completion_mode))
        num_tokens = 0
        for message in messages:
            parts = [message.content] if isinstance(message.content, str | None) else message.content
            for part in parts:
                if isinstance(part, ImagePart):
                    if part.url == "bad":
                        raise ImageLoadError(
                            "messages.0.content.0: image could not be decoded", param="messages"
                        )
                    num_tokens += IMAGE_TOKENS
                elif part is not None:
                    text = part if isinstance(part, str) else part.text
                    num_tokens += len(text.split())
        return FakePrompt(prompt_token_ids=list(range(num_tokens)), images=[], prompt_text="")


@dataclass
class FakeModelServer:
    engine: FakeEngine = field(default_factory=FakeEngine)
    preprocessor: FakePreprocessor = field(default_factory=FakePreprocessor)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    tokenizer_info: TokenizerInfo = field(default_factory=byte_tokenizer_info)
    served_model_name: str = MODEL
    max_model_len: int = 4096
    created: int = field(default_factory=lambda: int(time.time()))
    metadata: dict[str, Any] = field(
        default_factory=lambda: {
            "architecture": "FakeVLM",
            "dtype": "float32",
            "device": "cpu",
            "tokens_per_tile": 256,
        }
    )
    closed: bool = False

    async def aclose(self) -> None:
        self.closed = True


def chat_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
    body.update(overrides)
    return body


def parse_sse(text: str) -> list[Any]:
    """The data of each event: parsed JSON, or the string "[DONE]"."""
    import json

    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


class LoadFailures:
    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def __call__(self, exc: BaseException) -> None:
        self.errors.append(exc)


async def wait_until_ready(client: httpx.AsyncClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/v1/health/ready")).status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        await asyncio.sleep(0.01)


def assert_error(
    response: httpx.Response, status: int, *needles: str, param: str | bool | None = False
) -> None:
    """`response` is an error in the contract's shape with `status`, whose message holds every needle."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])
    if param is not False:
        assert error["param"] == param, error
