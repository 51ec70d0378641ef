"""The front end's processed-image cache: LRU by bytes, and the preprocessor's use of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image

from tests.unit.inputs.helpers import SMALL_TILE_CONFIG, data_url, encode_image
from vlmserve.config import ServerConfig
from vlmserve.errors import ImageLoadError
from vlmserve.inputs import image_cache
from vlmserve.inputs.image_cache import ProcessedImageCache
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.preprocess import InputPreprocessor
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart


@dataclass(frozen=True)
class _Image:
    pixel_values: torch.Tensor


def _entry(num_floats: int) -> _Image:
    return _Image(torch.zeros(num_floats))  # 4 bytes a float


def test_lru_within_the_byte_budget() -> None:
    cache: ProcessedImageCache[_Image] = ProcessedImageCache(max_bytes=100)
    a, b, c = _entry(10), _entry(10), _entry(6)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.num_bytes == 80
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)  # 40 + 40 + 24 > 100: b (least recently used) goes
    assert cache.get("b") is None
    assert cache.get("a") is a and cache.get("c") is c
    assert cache.num_bytes == 64
    assert (cache.hits, cache.misses) == (3, 1)


def test_too_big_or_zero_budget_stores_nothing() -> None:
    cache: ProcessedImageCache[_Image] = ProcessedImageCache(max_bytes=16)
    cache.put("big", _entry(5))
    assert len(cache) == 0 and cache.num_bytes == 0
    off: ProcessedImageCache[_Image] = ProcessedImageCache(max_bytes=0)
    off.put("x", _entry(1))
    assert off.get("x") is None
    with pytest.raises(ValueError, match="max_bytes"):
        ProcessedImageCache(max_bytes=-1)


def test_key_covers_the_bytes_and_the_tile_budget() -> None:
    cache: ProcessedImageCache[_Image] = ProcessedImageCache(max_bytes=100)
    assert cache.key(b"abc", 12) == cache.key(b"abc", 12)
    assert cache.key(b"abc", 12) != cache.key(b"abd", 12)
    assert cache.key(b"abc", 12) != cache.key(b"abc", 1)


def test_off_has_no_key_and_every_lookup_misses() -> None:
    off: ProcessedImageCache[_Image] = ProcessedImageCache(max_bytes=0)
    assert off.key(b"abc", 12) is None
    off.put(None, _entry(1))
    assert off.get(None) is None and (off.hits, off.misses) == (0, 1)


class _CountingProcessor(NemotronVLProcessor):
    calls = 0

    def process(self, image: Image.Image, *, max_tiles: int | None = None) -> Any:
        type(self).calls += 1
        return super().process(image, max_tiles=max_tiles)


def _preprocessor(tokenizer: Any, **settings: Any) -> InputPreprocessor:
    config = ServerConfig(**settings)
    _CountingProcessor.calls = 0
    processor = _CountingProcessor(SMALL_TILE_CONFIG, tokenizer, max_tiles=12)
    return InputPreprocessor(tokenizer, processor, config)


async def _images(preprocessor: InputPreprocessor, url: str, detail: str = "auto") -> list[Any]:
    message = ChatMessage("user", [ImagePart(url, detail=detail), TextPart("What is this?")])
    return (await preprocessor.prepare([message], completion_mode=False)).images


async def test_same_image_again_is_not_processed_again(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer)
    url = data_url(encode_image(Image.new("RGB", (200, 40), (10, 200, 30))))
    first = await _images(preprocessor, url)
    second = await _images(preprocessor, url)
    assert _CountingProcessor.calls == 1
    assert second[0].content_hash == first[0].content_hash
    assert torch.equal(second[0].pixel_values, first[0].pixel_values)
    assert second[0].num_tiles == first[0].num_tiles > 1
    # another budget (detail low: one tile) is another entry
    low = await _images(preprocessor, url, detail="low")
    assert _CountingProcessor.calls == 2 and low[0].num_tiles == 1
    # another picture is processed
    other = data_url(encode_image(Image.new("RGB", (200, 40), (10, 200, 31))))
    assert (await _images(preprocessor, other))[0].content_hash != first[0].content_hash
    assert _CountingProcessor.calls == 3
    await preprocessor.aclose()


async def test_off_processes_every_time_without_hashing_the_file(
    tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    preprocessor = _preprocessor(tiny_tokenizer, image_cache_bytes=0)
    url = data_url(encode_image(Image.new("RGB", (64, 64), (1, 2, 3))))
    file_hashes: list[bytes] = []
    real_sha256 = image_cache.hashlib.sha256

    def recording_sha256(data: bytes = b"") -> Any:
        file_hashes.append(data)
        return real_sha256(data)

    monkeypatch.setattr(image_cache.hashlib, "sha256", recording_sha256)
    images = [(await _images(preprocessor, url))[0] for _ in range(2)]
    assert _CountingProcessor.calls == 2
    assert images[0].content_hash == images[1].content_hash  # the pixels' hash is still taken
    assert not [data for data in file_hashes if data.startswith(b"\x89PNG")]  # the file's is not
    await preprocessor.aclose()


async def test_a_bad_image_is_refused_every_time(tiny_tokenizer: Any) -> None:
    preprocessor = _preprocessor(tiny_tokenizer)
    broken = data_url(encode_image(Image.new("RGB", (64, 64)))[:40])  # a cut-off PNG
    for _ in range(2):
        with pytest.raises(ImageLoadError):
            await _images(preprocessor, broken)
    assert len(preprocessor.image_cache) == 0
    await preprocessor.aclose()
