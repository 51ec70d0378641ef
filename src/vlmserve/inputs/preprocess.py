"""Validated chat messages -> engine-ready prompt token ids and image tensors.

Order of work for one request: parse content, refuse too many images and unknown detail levels
(before any fetch or decode), load the images concurrently (http fetches on the event loop; asset
lookups, base64, decoding and tiling in worker threads; each image tiled within the budget its detail
asks for), render the chat template with one sentinel per image, then tokenize and splice in each
image's tokens. Nothing here runs in the engine's step loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from vlmserve.config import ServerConfig
from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.assets import AssetStore
from vlmserve.inputs.chat_template import render_chat
from vlmserve.inputs.content import ParsedMessage, parse_messages
from vlmserve.inputs.image_cache import ProcessedImageCache
from vlmserve.inputs.media import (
    asset_reference,
    create_fetch_client,
    decode_data_url,
    decode_image,
    fetch_image,
)
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor, ProcessedImage
from vlmserve.metrics.stats import ImageStats
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


def max_tiles_for_detail(detail: str, config: ServerConfig, max_tiles: int) -> int:
    """An image's tile budget: low = 1 (the whole image as one tile), high = `max_tiles` (the
    processor's: --max-tiles, or the model's own limit), auto = whichever config.default_image_detail
    names."""
    if detail == "auto":
        detail = config.default_image_detail
    if detail == "low":
        return 1
    if detail == "high":
        return max_tiles
    raise InvalidRequestError(
        f"image detail must be 'auto', 'low' or 'high', got {detail!r}", param="messages"
    )


class InputPreprocessor:
    """Owns the image-fetching HTTP client (call aclose() when done) and the image asset store
    (`assets`: the HTTP layer's upload endpoint puts into the same store)."""

    def __init__(
        self,
        tokenizer: Any,
        processor: NemotronVLProcessor,
        config: ServerConfig,
        *,
        client: httpx.AsyncClient | None = None,
        assets: AssetStore | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.assets = assets if assets is not None else AssetStore.from_config(config)
        self._client = client if client is not None else create_fetch_client(config)
        # images turned into tiles and the seconds it took, added up (read by the metrics exporter)
        self.stats = ImageStats()
        # the same encoded image again (the next turn of a chat about it) skips decoding and tiling
        self.image_cache: ProcessedImageCache[ProcessedImage] = ProcessedImageCache(config.image_cache_bytes)

    async def prepare(
        self,
        messages: list[ChatMessage],
        *,
        completion_mode: bool,
        asset_ids: frozenset[str] = frozenset(),
    ) -> PreparedPrompt:
        """Prompt ids and images for `messages` (already validated by the HTTP layer).

        asset_ids: the ids the request's NVCF-INPUT-ASSET-REFERENCES header lists (parse it with
        inputs.assets.parse_asset_references); an image may use an asset only when it is listed.
        Raises InvalidRequestError (too many images, unknown detail, template failure, image token in
        text), ImageLoadError (including every asset failure) or UnsupportedMediaTypeError.
        """
        parsed = parse_messages(messages)
        image_parts = [image for message in parsed for image in message.images]
        self._check_image_count(len(image_parts))
        limit = self.processor.max_tiles
        budgets = [max_tiles_for_detail(part.detail, self.config, limit) for part in image_parts]
        images = await _gather_or_cancel(
            [self._load(part, budget, asset_ids) for part, budget in zip(image_parts, budgets, strict=True)]
        )
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

    async def _load(self, part: ImagePart, max_tiles: int, asset_ids: frozenset[str]) -> ProcessedImage:
        started = time.perf_counter()
        if part.url[:5].lower() == "data:":
            image = await asyncio.to_thread(self._process_data_url, part.url, max_tiles, asset_ids)
        else:
            data = await fetch_image(part.url, client=self._client, config=self.config)
            image = await asyncio.to_thread(self._process_bytes, data, max_tiles)
        self.stats.add(time.perf_counter() - started)
        return image

    def _process_data_url(self, url: str, max_tiles: int, asset_ids: frozenset[str]) -> ProcessedImage:
        asset_id = asset_reference(url)
        if asset_id is not None:
            data = self.assets.resolve(asset_id, asset_ids)
        else:
            data = decode_data_url(url, max_bytes=self.config.image_max_bytes)
        return self._process_bytes(data, max_tiles)

    def _process_bytes(self, data: bytes, max_tiles: int) -> ProcessedImage:
        key = self.image_cache.key(data, max_tiles)
        processed = self.image_cache.get(key)
        if processed is None:
            image = decode_image(data, max_pixels=self.config.image_max_pixels)
            processed = self.processor.process(image, max_tiles=max_tiles)
            self.image_cache.put(key, processed)
        return processed

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
