from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.unit.inputs.helpers import SMALL_TILE_CONFIG, encode_image, png_data_url
from vlmserve.config import ServerConfig
from vlmserve.errors import ImageLoadError, InvalidRequestError, UnsupportedMediaTypeError
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.preprocess import InputPreprocessor, PreparedPrompt, max_tiles_for_detail
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart

PNG = encode_image(Image.new("RGB", (64, 32), (0, 128, 255)))


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> Any:
        yield self.data


def _refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be fetched, got {request.url}")


def _preprocessor(tokenizer: Any, handler: Any = _refuse, **settings: Any) -> InputPreprocessor:
    config = ServerConfig(**({"allow_private_image_urls": True} | settings))
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tokenizer, max_tiles=config.max_tiles or 12)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return InputPreprocessor(tokenizer, processor, config, client=client)


def _hf_ids(
    tokenizer: Any, messages: list[dict[str, str]], tiles: list[int], completion: bool = False
) -> list[int]:
    """Render with "<image>\\n" in the text, expand each <image> to <img><image>*N</img>, tokenize."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not completion, continue_final_message=completion
    )
    pieces = text.split("<image>")
    expanded = pieces[0]
    for num_tiles, piece in zip(tiles, pieces[1:], strict=True):
        expanded += "<img>" + "<image>" * (4 * num_tiles) + "</img>" + piece
    return tokenizer(expanded, add_special_tokens=False)["input_ids"]


def _check_spans(prepared: PreparedPrompt, image_token_id: int) -> None:
    for image in prepared.images:
        span = prepared.prompt_token_ids[image.offset:image.offset + image.length]
        assert span == [image_token_id] * image.length
        assert image.pixel_values.shape[0] == image.num_tiles


async def test_list_and_tag_images_in_place(tiny_tokenizer: Any) -> None:
    handler = lambda request: httpx.Response(200, stream=_Body(PNG))  # noqa: E731
    preprocessor = _preprocessor(tiny_tokenizer, handler)
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", [ImagePart(png_data_url(32, 32)), TextPart("What is this?")]),
        ChatMessage("assistant", "A square."),
        ChatMessage("user", f'Compare <img src="{png_data_url(20, 90)}" /> with <img src="http://127.0.0.1/a">'),
    ]
    prepared = await preprocessor.prepare(messages, completion_mode=False)
    await preprocessor.aclose()
    tiles = [image.num_tiles for image in prepared.images]
    assert tiles == [1, 6, 3]
    hf_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Compare <image>\n with <image>\n"},
    ]
    assert prepared.prompt_token_ids == _hf_ids(tiny_tokenizer, hf_messages, tiles)
    _check_spans(prepared, preprocessor.processor.image_token_id)
    assert len({image.content_hash for image in prepared.images}) == 3


async def test_completion_mode(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer)
    messages = [ChatMessage("user", [ImagePart(png_data_url(32, 32)), TextPart("Hi")]),
                ChatMessage("assistant", "Sure, the")]
    prepared = await preprocessor.prepare(messages, completion_mode=True)
    hf_messages = [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Sure, the"}]
    assert prepared.prompt_token_ids == _hf_ids(tiny_tokenizer, hf_messages, [1], completion=True)
    empty = await preprocessor.prepare([messages[0], ChatMessage("assistant", None)], completion_mode=True)
    plain = await preprocessor.prepare(messages[:1], completion_mode=False)
    assert empty.prompt_token_ids == plain.prompt_token_ids
    await preprocessor.aclose()


async def test_too_many_images_refused_before_loading(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer, max_images_per_prompt=2)
    bad = "data:image/gif;base64,R0lGODlh"  # would be a 415 if it were decoded
    messages = [ChatMessage("user", [ImagePart(bad), ImagePart("http://10.0.0.1/a.png"), ImagePart(bad)])]
    with pytest.raises(InvalidRequestError, match="at most 2 images") as info:
        await preprocessor.prepare(messages, completion_mode=False)
    assert info.value.param == "messages"
    await preprocessor.aclose()


async def test_image_errors_surface(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer, handler=lambda request: httpx.Response(404))
    with pytest.raises(UnsupportedMediaTypeError):
        await preprocessor.prepare([ChatMessage("user", [ImagePart("data:image/webp;base64,AAAA")])],
                                   completion_mode=False)
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        await preprocessor.prepare([ChatMessage("user", [ImagePart("http://127.0.0.1/x.png")])],
                                   completion_mode=False)
    await preprocessor.aclose()


async def test_loads_run_concurrently_and_a_failure_cancels_the_rest(tiny_tokenizer: Any) -> None:
    in_flight = 0
    most_in_flight = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(10.0 if request.url.path == "/slow.png" else 0.2)
        in_flight -= 1
        return httpx.Response(200, stream=_Body(PNG))

    preprocessor = _preprocessor(tiny_tokenizer, handler)
    urls = [f"http://127.0.0.1/{i}.png" for i in range(3)]
    messages = [ChatMessage("user", [ImagePart(url) for url in urls])]
    prepared = await preprocessor.prepare(messages, completion_mode=False)
    assert len(prepared.images) == 3 and most_in_flight == 3

    started = time.monotonic()
    parts = [ImagePart("http://127.0.0.1/slow.png"), ImagePart("data:image/png;base64,!!!")]
    with pytest.raises(ImageLoadError, match="base64"):
        await preprocessor.prepare([ChatMessage("user", parts)], completion_mode=False)
    assert time.monotonic() - started < 5.0
    await preprocessor.aclose()
    assert preprocessor._client.is_closed


async def test_image_token_in_text_is_refused(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer)
    with pytest.raises(InvalidRequestError, match="image token"):
        await preprocessor.prepare([ChatMessage("user", "describe <image> please")], completion_mode=False)
    await preprocessor.aclose()


# ------------------------------------------------------------------------------------------ image detail

WIDE = png_data_url(200, 40)


async def _prepare_one(tokenizer: Any, part_or_text: ImagePart | str, **settings: Any) -> PreparedPrompt:
    preprocessor = _preprocessor(tokenizer, **settings)
    content = part_or_text if isinstance(part_or_text, str) else [part_or_text, TextPart("What is this?")]
    prepared = await preprocessor.prepare([ChatMessage("user", content)], completion_mode=False)
    await preprocessor.aclose()
    return prepared


async def test_detail_low_is_one_tile_and_high_is_the_full_budget(tiny_tokenizer: Any) -> None:
    low = await _prepare_one(tiny_tokenizer, ImagePart(WIDE, detail="low"))
    high = await _prepare_one(tiny_tokenizer, ImagePart(WIDE, detail="high"))
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12)
    num_tiles = processor.num_tiles(200, 40)
    assert num_tiles > 1
    assert [image.num_tiles for image in low.images] == [1]
    assert [image.num_tiles for image in high.images] == [num_tiles]
    # usage.prompt_tokens is len(prompt_token_ids): it differs by exactly the extra tiles' tokens
    extra = (num_tiles - 1) * processor.tokens_per_tile
    assert len(high.prompt_token_ids) - len(low.prompt_token_ids) == extra
    _check_spans(low, processor.image_token_id)
    _check_spans(high, processor.image_token_id)
    # one image at two budgets: two embedding-cache keys
    assert low.images[0].content_hash != high.images[0].content_hash


@pytest.mark.parametrize(("default", "expected"), [("high", "high"), ("low", "low")])
async def test_auto_and_img_tags_follow_the_server_default(
    tiny_tokenizer: Any, default: str, expected: str
) -> None:
    reference = await _prepare_one(tiny_tokenizer, ImagePart(WIDE, detail=expected))
    auto = await _prepare_one(tiny_tokenizer, ImagePart(WIDE, detail="auto"), default_image_detail=default)
    assert auto.images[0].num_tiles == reference.images[0].num_tiles
    assert auto.images[0].content_hash == reference.images[0].content_hash
    tag = await _prepare_one(tiny_tokenizer, f'<img src="{WIDE}" />', default_image_detail=default)
    assert tag.images[0].num_tiles == reference.images[0].num_tiles


async def test_high_follows_max_tiles(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer, max_tiles=4)
    prepared = await preprocessor.prepare([ChatMessage("user", [ImagePart(WIDE, detail="high")])],
                                          completion_mode=False)
    assert prepared.images[0].num_tiles == preprocessor.processor.num_tiles(200, 40) <= 5
    await preprocessor.aclose()


async def test_unknown_detail_is_400_before_loading(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer)
    message = ChatMessage("user", [ImagePart("http://10.0.0.1/a.png", detail="ultra")])
    with pytest.raises(InvalidRequestError, match="must be 'auto', 'low' or 'high', got 'ultra'") as info:
        await preprocessor.prepare([message], completion_mode=False)
    assert info.value.status == 400 and info.value.param == "messages"
    await preprocessor.aclose()


def test_max_tiles_for_detail() -> None:
    config = ServerConfig()
    assert [max_tiles_for_detail(d, config, 7) for d in ("low", "high", "auto")] == [1, 7, 7]
    low_default = ServerConfig(default_image_detail="low")
    assert max_tiles_for_detail("auto", low_default, 7) == 1
