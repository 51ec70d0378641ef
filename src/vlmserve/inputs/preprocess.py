"""Validated chat messages -> engine-ready prompt token ids and image tensors.

Order of work for one request: parse content, refuse too many images (before any fetch or decode),
load the images concurrently (http fetches on the event loop; base64, decoding and tiling in worker
threads), render the chat template with one sentinel per image, then tokenize and splice in each
image's tokens. Nothing here runs in the engine's step loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from vlmserve.config import ServerConfig
from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.chat_template import render_chat
from vlmserve.inputs.content import ParsedMessage, parse_messages
from vlmserve.inputs.media import create_fetch_client, decode_data_url, decode_image, fetch_image
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor, ProcessedImage
from vlmserve.protocol.types import ChatMessage, ImageInput, ImagePart

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A request's prompt as the engine takes it."""

    # the full prompt, image tokens expanded (<img> + <image> x num_tiles * tokens_per_tile + </img>)
    prompt_token_ids: list[int]
    # one per image, in prompt order; offset/length locate its <image> tokens in prompt_token_ids
    images: list[ImageInput]
    # the rendered chat template with the image sentinels (for debugging; never logged at INFO)
    prompt_text: str


class InputPreprocessor:
    """Owns the image-fetching HTTP client; call aclose() when done."""

    def __init__(
        self,
        tokenizer: Any,
        processor: NemotronVLProcessor,
        config: ServerConfig,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self._client = client if client is not None else create_fetch_client(config)

    async def prepare(self, messages: list[ChatMessage], *, completion_mode: bool) -> PreparedPrompt:
        """Prompt ids and images for `messages` (already validated by the HTTP layer).

        Raises InvalidRequestError (too many images, template failure, image token in text),
        ImageLoadError or UnsupportedMediaTypeError.
        """
        parsed = parse_messages(messages)
        image_parts = [image for message in parsed for image in message.images]
        self._check_image_count(len(image_parts))
        images = await _gather_or_cancel([self._load(part) for part in image_parts])
        sentinel = _new_sentinel(parsed)
        return await asyncio.to_thread(self._build, parsed, images, sentinel, completion_mode)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check_image_count(self, num_images: int) -> None:
        limit = self.config.max_images_per_prompt
        if num_images > limit:
            raise InvalidRequestError(
                f"messages hold {num_images} images; at most {limit} images per request are allowed",
                param="messages",
            )

    async def _load(self, part: ImagePart) -> ProcessedImage:
        if part.url[:5].lower() == "data:":
            return await asyncio.to_thread(self._process_data_url, part.url)
        data = await fetch_image(part.url, client=self._client, config=self.config)
        return await asyncio.to_thread(self._process_bytes, data)

    def _process_data_url(self, url: str) -> ProcessedImage:
        return self._process_bytes(decode_data_url(url, max_bytes=self.config.image_max_bytes))

    def _process_bytes(self, data: bytes) -> ProcessedImage:
        image = decode_image(data, max_pixels=self.config.image_max_pixels)
        return self.processor.process(image)

    def _build(
        self, parsed: list[ParsedMessage], images: list[ProcessedImage], sentinel: str, completion_mode: bool
    ) -> PreparedPrompt:
        prompt_text = render_chat(self.tokenizer, parsed, sentinel=sentinel, completion_mode=completion_mode)
        prompt_token_ids, image_inputs = self.processor.build_prompt(prompt_text, sentinel, images)
        return PreparedPrompt(prompt_token_ids, image_inputs, prompt_text)


def _new_sentinel(parsed: list[ParsedMessage]) -> str:
    """A marker that occurs in no message text (random, and checked)."""
    texts = [item for message in parsed for item in message.items if isinstance(item, str)]
    while True:
        sentinel = f"<|vlmserve-image-{secrets.token_hex(8)}|>"
        if not any(sentinel in text for text in texts):
            return sentinel


async def _gather_or_cancel(awaitables: list[Awaitable[T]]) -> list[T]:
    """asyncio.gather, but the first failure cancels the other loads instead of leaving them running."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
