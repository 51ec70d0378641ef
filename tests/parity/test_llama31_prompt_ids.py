"""Prompt token ids of the input pipeline against transformers on the real Llama 3.1 tokenizer.

The reference is the HF path: messages with "<image>\\n" in their text, each <image> replaced by
<img> + <image> * (256 * tiles) + </img>, then apply_chat_template(..., tokenize=True).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.unit.inputs.helpers import NEMOTRON_CONFIG, data_url, encode_image
from vlmserve.config import ServerConfig
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.preprocess import InputPreprocessor
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart

SQUARE = data_url(encode_image(Image.new("RGB", (256, 256), (250, 200, 10))))  # 1 tile
# 2 tiles + the thumbnail
WIDE = data_url(encode_image(Image.new("RGB", (1024, 512), (5, 90, 200)), "JPEG"), "image/jpeg")
TILES = {SQUARE: 1, WIDE: 3}


def _no_fetch(request: httpx.Request) -> httpx.Response:
    raise AssertionError("parity conversations use data URLs only")


@pytest.fixture(scope="module")
def llama31_tokenizer(llama31_tokenizer_dir: Path) -> Any:
    return load_tokenizer(llama31_tokenizer_dir)


def _expand(text: str, urls: list[str]) -> str:
    pieces = text.split("<image>")
    out = pieces[0]
    for url, piece in zip(urls, pieces[1:], strict=True):
        out += "<img>" + "<image>" * (256 * TILES[url]) + "</img>" + piece
    return out


def _hf_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], list[str]]:
    """The messages as HF gets them ("<image>\\n" where each image was), and the image urls in order."""
    converted, urls = [], []
    for message in messages:
        if isinstance(message.content, list):
            text = ""
            for part in message.content:
                if isinstance(part, ImagePart):
                    text += "<image>\n"
                    urls.append(part.url)
                else:
                    text += part.text
            converted.append({"role": message.role, "content": text})
        else:
            converted.append({"role": message.role, "content": message.content or ""})
    return converted, urls


def _hf_ids(tokenizer: Any, messages: list[ChatMessage], completion_mode: bool) -> list[int]:
    converted, urls = _hf_messages(messages)
    expanded, start = [], 0
    for message in converted:
        count = message["content"].count("<image>")
        content = _expand(message["content"], urls[start:start + count])
        expanded.append({"role": message["role"], "content": content})
        start += count
    encoded = tokenizer.apply_chat_template(
        expanded,
        tokenize=True,
        add_generation_prompt=not completion_mode,
        continue_final_message=completion_mode,
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


CONVERSATIONS = {
    "system_and_text": [
        ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Hello there!")
    ],
    "one_image": [ChatMessage("user", [ImagePart(SQUARE), TextPart("What color is this?")])],
    "two_images": [
        ChatMessage("system", "Answer in one sentence."),
        ChatMessage("user", [ImagePart(SQUARE), ImagePart(WIDE), TextPart("Which image is wider?")]),
    ],
    "image_between_text": [
        ChatMessage("user", [TextPart("Look: "), ImagePart(WIDE), TextPart("Describe it.")])
    ],
    "multi_turn": [
        ChatMessage("user", [ImagePart(WIDE), TextPart("Describe the image.")]),
        ChatMessage("assistant", "A blue rectangle."),
        ChatMessage("user", [ImagePart(SQUARE), TextPart("And this one?\n\nBe precise.")]),
    ],
    "completion_mode": [
        ChatMessage("user", [ImagePart(SQUARE), TextPart("Name the color.")]),
        ChatMessage("assistant", "The color is"),
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_prompt_ids_match_transformers(llama31_tokenizer: Any, name: str) -> None:
    messages = CONVERSATIONS[name]
    completion_mode = messages[-1].role == "assistant"
    processor = NemotronVLProcessor(NEMOTRON_CONFIG, llama31_tokenizer, max_tiles=12)
    client = httpx.AsyncClient(transport=httpx.MockTransport(_no_fetch))
    preprocessor = InputPreprocessor(llama31_tokenizer, processor, ServerConfig(), client=client)
    prepared = await preprocessor.prepare(messages, completion_mode=completion_mode)
    await preprocessor.aclose()
    expected = _hf_ids(llama31_tokenizer, messages, completion_mode)
    assert prepared.prompt_token_ids == expected
    assert prepared.prompt_token_ids[0] == llama31_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert prepared.prompt_token_ids.count(processor.image_token_id) == sum(i.length for i in prepared.images)
