"""Tokenize, detokenize and render: what the model would see, without running it.

- `tokenize()`: vLLM's /tokenize. A plain prompt is tokenized as is; chat messages go through the
  chat pipeline (the same rules, images and assets included) so the count is what a chat request
  with those messages would take.
- `detokenize()`: vLLM's /detokenize, token ids back to text (special tokens kept).
- `render()`: /v1/chat/completions/render, a chat request checked and prepared by the very code that
  serves it (`ChatCompletionService.prepare`), then reported instead of submitted: its prompt text
  with each image's tokens written out, its token ids, and per image its tiles and tokens.

No HTTP objects are touched here.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmserve.errors import InvalidRequestError, ModelNotFoundError
from vlmserve.inputs.assets import parse_asset_references
from vlmserve.protocol.openai import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    RenderedImage,
    RenderResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from vlmserve.server.serving_chat import ChatCompletionService

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer
    from vlmserve.inputs.preprocess import PreparedPrompt
    from vlmserve.protocol.types import ImageInput

# the preprocessor's image sentinel in PreparedPrompt.prompt_text (inputs/preprocess.py)
_IMAGE_SENTINEL = re.compile(r"<\|vlmserve-image-[0-9a-f]+\|>")


class TokenizeService:
    """Serves /tokenize, /detokenize and /v1/chat/completions/render against one loaded ModelServer."""

    def __init__(self, model_server: ModelServer) -> None:
        self.model_server = model_server
        self.tokenizer: Any = model_server.tokenizer
        self._chat = ChatCompletionService(model_server)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_server.served_model_name:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    async def tokenize(
        self,
        request: TokenizeCompletionRequest | TokenizeChatRequest,
        *,
        asset_references: str | None = None,
    ) -> TokenizeResponse:
        self._check_model(request.model)
        if isinstance(request, TokenizeCompletionRequest):
            ids = await asyncio.to_thread(
                self.tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens
            )
        else:
            ids = await self._tokenize_messages(request, asset_references)
        ids = [int(token_id) for token_id in ids]
        token_strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(ids),
            max_model_len=self.model_server.max_model_len,
            tokens=ids,
            token_strs=token_strs,
        )

    async def _tokenize_messages(
        self, request: TokenizeChatRequest, asset_references: str | None
    ) -> list[int]:
        # the prompt is rendered as for chat completions: a final assistant message is continued, any
        # other ends with the assistant header; flags asking for something else are refused, not ignored
        if request.continue_final_message and not request.is_completion_mode:
            raise InvalidRequestError(
                "continue_final_message: the last message must be an assistant message to continue",
                param="continue_final_message",
            )
        if not request.add_generation_prompt and not request.is_completion_mode:
            raise InvalidRequestError(
                "add_generation_prompt: false is supported only with a final assistant message (which is "
                "continued); a prompt ending in a user message always gets the assistant header, as in "
                "chat completions",
                param="add_generation_prompt",
            )
        asset_ids = parse_asset_references(asset_references)
        prompt = await self.model_server.preprocessor.prepare(
            request.to_chat_messages(), completion_mode=request.is_completion_mode, asset_ids=asset_ids
        )
        return prompt.prompt_token_ids

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        vocab_size = len(self.tokenizer)
        for index, token_id in enumerate(request.tokens):
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    f"tokens.{index}: {token_id} is not a token id of this model (0 to {vocab_size - 1})",
                    param=f"tokens.{index}",
                )
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens, skip_special_tokens=False))

    async def render(
        self, request: ChatCompletionRequest, *, asset_references: str | None = None
    ) -> RenderResponse:
        """The prompt of a chat request, checked exactly as chat completions check it (the same
        errors), without generating."""
        prompt, _params = await self._chat.prepare(request, asset_references=asset_references)
        spans = await asyncio.to_thread(image_spans, prompt, self.tokenizer)
        ids = prompt.prompt_token_ids
        if spans is None:
            # not the segment layout both processors use: report what is certain
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            images = [
                RenderedImage(num_tiles=image.num_tiles, num_tokens=image.num_embeds)
                for image in prompt.images
            ]
        else:
            pieces = _IMAGE_SENTINEL.split(prompt.prompt_text)
            expanded = [self.tokenizer.decode(ids[s.start : s.end], skip_special_tokens=False) for s in spans]
            text = "".join(piece + image for piece, image in zip(pieces, [*expanded, ""], strict=True))
            images = [
                RenderedImage(num_tiles=span.num_tiles, num_tokens=span.end - span.start) for span in spans
            ]
        return RenderResponse(
            prompt=text,
            prompt_token_ids=ids,
            num_prompt_tokens=len(ids),
            num_image_tokens=sum(image.num_tokens for image in images),
            images=images,
        )


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """Where one request image's tokens lie in the prompt ids (markers included), and its tiles."""

    start: int
    end: int
    num_tiles: int


def image_spans(prompt: PreparedPrompt, tokenizer: Any) -> list[ImageSpan] | None:
    """Each request image's token span in `prompt.prompt_token_ids`, or None when the ids are not laid
    out as the processors build them.

    Both processors tokenize the text between image sentinels on its own and put each image's ids
    (markers, then image-context runs, then markers) between those pieces. So the text pieces are
    found in order: image i's span runs from the end of piece i to the start of piece i + 1, which is
    the first match at or after the end of its last image-context run. A request image is one
    ImageInput (Nemotron-VL) or several sub-images whose content hashes end in "#0", "#1", ...
    (Idefics3). When two images touch (no text between them), the first is given the same number of
    leading marker tokens as the second.
    """
    ids = prompt.prompt_token_ids
    pieces = _IMAGE_SENTINEL.split(prompt.prompt_text)
    groups = _image_groups(prompt.images)
    if len(groups) != len(pieces) - 1:
        return None
    piece_ids = [tokenizer.encode(piece, add_special_tokens=False) if piece else [] for piece in pieces]
    if ids[: len(piece_ids[0])] != piece_ids[0]:
        return None
    position = len(piece_ids[0])
    spans: list[ImageSpan] = []
    for index, group in enumerate(groups):
        start = position
        first, last = group[0], group[-1]
        if first.offset < start:
            return None
        following = piece_ids[index + 1]
        end = _find(ids, following, last.offset + last.length) if following else None
        if end is None and not following:
            if index + 1 < len(groups):
                end = groups[index + 1][0].offset - (first.offset - start)
            else:
                end = len(ids)
        if end is None or end < last.offset + last.length:
            return None
        spans.append(ImageSpan(start, end, sum(image.num_tiles for image in group)))
        position = end + len(following)
    return spans if position == len(ids) else None


def _image_groups(images: list[ImageInput]) -> list[list[ImageInput]]:
    groups: list[list[ImageInput]] = []
    for image in images:
        _, sep, index = image.content_hash.rpartition("#")
        if groups and sep and index != "0":
            groups[-1].append(image)
        else:
            groups.append([image])
    return groups


def _find(ids: list[int], needle: list[int], start: int) -> int | None:
    head = needle[0]
    for position in range(start, len(ids) - len(needle) + 1):
        if ids[position] == head and ids[position : position + len(needle)] == needle:
            return position
    return None
