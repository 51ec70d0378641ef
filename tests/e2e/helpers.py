"""Helpers for the end-to-end tests: tiny images, data URLs, request bodies, error checks, SSE parsing."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from tokenizers import Tokenizer

MODEL = "nvidia/llama-3.1-nemotron-nano-vl-8b-v1"
CHAT_ID = re.compile(r"^chat-[0-9a-f]{32}$")
TEXT = "What is in this image?"
# the tiny checkpoint: 64x64 tiles of 4 tokens each
TOKENS_PER_TILE = 4


def image_bytes(width: int, height: int, fmt: str, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    image = Image.new("RGB", (width, height), color)
    # a little structure, so that different images give different features
    for x in range(0, width, 7):
        image.putpixel((x, x % height), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def demo_picture_png(scene: Any, seed: int = 0) -> bytes:
    """A PNG of a demo-model scene (vlmserve.demo.shapes), drawn with a fixed seed."""
    import random

    from vlmserve.demo.shapes import render

    buffer = io.BytesIO()
    render(scene, random.Random(seed)).save(buffer, "PNG")
    return buffer.getvalue()


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return image_bytes(width, height, "PNG", color)


def jpeg_bytes(width: int, height: int) -> bytes:
    return image_bytes(width, height, "JPEG")


def gif_bytes(width: int, height: int) -> bytes:
    return image_bytes(width, height, "GIF")


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims width x height: only the header is large."""
    data = bytearray(png_bytes(1, 1))
    # signature (8) + length (4) + b"IHDR" (4): the 13 IHDR data bytes start at 16
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user_with_images(*urls: str, text: str = TEXT) -> list[dict[str, Any]]:
    """One user message: the images first, then the text (the seed's order is image, text)."""
    return [{"role": "user", "content": [*(image_part(url) for url in urls), {"type": "text", "text": text}]}]


def user_text(text: str = TEXT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def image_token_count(num_tiles: int) -> int:
    """<img> + tokens_per_tile x <image> per tile + </img>."""
    return 2 + TOKENS_PER_TILE * num_tiles


def newline_token_count(checkpoint_dir: Path, text: str = TEXT) -> int:
    """Tokens the newline after each image adds before `text` (the template writes image + "\\n")."""
    tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    with_newline = tokenizer.encode("\n" + text, add_special_tokens=False).ids
    return len(with_newline) - len(tokenizer.encode(text, add_special_tokens=False).ids)


def expect_api_error(
    exc_info: pytest.ExceptionInfo[openai.APIStatusError], status: int, *needles: str
) -> dict[str, Any]:
    """The error of an SDK exception: its status, the contract's body shape, and the message's words."""
    exc = exc_info.value
    assert exc.status_code == status, exc.response.text
    return check_error_body(exc.response, status, *needles)


def check_error_body(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status
    assert isinstance(error["type"], str) and error["type"]
    for needle in needles:
        assert needle.lower() in error["message"].lower(), (needle, error["message"])
    return error


def parse_sse(text: str) -> list[Any]:
    """The events of an event-stream body: each JSON payload, and the final "[DONE]" as a string.
    Every event must be exactly one `data: ...` line followed by a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events: list[Any] = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
