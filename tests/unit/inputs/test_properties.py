"""Property tests: parsers of untrusted input raise only VLMServeError subclasses (mapped to 4xx), never
anything else (which would be a 500), on arbitrary text and bytes and on mutations of valid input.

Example counts are bounded and the example database is off, so the suite stays fast and leaves no files.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.unit.inputs.helpers import encode_image
from vlmserve.config import ServerConfig
from vlmserve.errors import VLMServeError
from vlmserve.inputs.assets import parse_asset_references
from vlmserve.inputs.content import parse_content, split_img_tags
from vlmserve.inputs.media import asset_reference, check_image_url, decode_data_url, decode_image
from vlmserve.protocol.types import ChatMessage, ImagePart

BOUNDED = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
MAX_BYTES = 1 << 16
MAX_PIXELS = 1 << 20
PNG = encode_image(Image.new("RGBA", (7, 5), (10, 20, 30, 128)))
JPEG = encode_image(Image.new("RGB", (9, 4), (200, 100, 50)), "JPEG")

# Pieces that steer random text into the parsers' interesting branches.
_FRAGMENTS = [
    "<img", "<IMG ", " src=", "src =", '"', "'", ">", "/>", " data-src=", "data:", "image/png", "image/jpeg",
    "image/gif", "text/plain", ";", ",", "base64", "asset_id", "=", "==", "%", "\n", " ", "\x00", "é", "😀",
    "iVBORw0KGgo", "/9j/", "AAAA", "http://", "https://", "[::1]", "@", ":", "#", "?", "127.0.0.1",
]
_pieces = st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8))
_steered_text = st.lists(_pieces, max_size=24).map("".join)
_any_text = st.one_of(st.text(max_size=200), _steered_text)


def _only_vlmserve_errors(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except VLMServeError as e:
        assert 400 <= e.status < 500, e
        return None


@BOUNDED
@given(_any_text)
def test_split_img_tags_and_parse_content(text: str) -> None:
    items = _only_vlmserve_errors(split_img_tags, text)
    assert items is not None  # splitting never fails
    texts = [item for item in items if isinstance(item, str)]
    assert all(piece and piece in text for piece in texts)
    if not any(isinstance(item, ImagePart) for item in items):
        assert "".join(texts) == text
    for role in ("user", "system", "assistant"):
        _only_vlmserve_errors(parse_content, ChatMessage(role, text))


def _data_urls() -> st.SearchStrategy[str]:
    media_type = st.sampled_from(["image/png", "image/jpeg", "image/jpg", "IMAGE/PNG", "image/gif", "", "x"])
    params = st.lists(st.sampled_from(["base64", "asset_id", "charset=utf-8", " base64 ", ""]), max_size=3)
    payload = st.one_of(
        st.text(max_size=64),
        st.binary(max_size=48).map(lambda data: base64.b64encode(data).decode()),
        st.sampled_from([base64.b64encode(PNG).decode(), "====", "A", "AB", "ABC=", "\n\t "]),
    )
    return st.builds(lambda m, p, d: f"data:{';'.join([m, *p])},{d}", media_type, params, payload)


@BOUNDED
@given(st.one_of(_any_text, _data_urls()))
def test_decode_data_url_and_asset_reference(url: str) -> None:
    _only_vlmserve_errors(decode_data_url, url, max_bytes=MAX_BYTES)
    _only_vlmserve_errors(asset_reference, url)


def _mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Truncations and byte overwrites of a valid image, so that Pillow parses some way in."""
    truncated = st.integers(0, len(original)).map(lambda n: original[:n])
    change = st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255))
    flips = st.lists(change, min_size=1, max_size=6)

    def overwrite(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(original)
        for index, value in changes:
            data[index] = value
        return bytes(data)

    return st.one_of(truncated, flips.map(overwrite))


@BOUNDED
@given(st.one_of(st.binary(max_size=512), _mutations(PNG), _mutations(JPEG)))
def test_decode_image(data: bytes) -> None:
    image = _only_vlmserve_errors(decode_image, data, max_pixels=MAX_PIXELS)
    if image is not None:
        assert image.mode == "RGB" and image.size[0] * image.size[1] <= MAX_PIXELS


@BOUNDED
@given(st.one_of(st.text(max_size=400), _steered_text))
def test_parse_asset_references(header: str) -> None:
    ids = _only_vlmserve_errors(parse_asset_references, header)
    if ids is not None:
        assert len(header) <= 370 or not header.strip()


_URL_CONFIG = ServerConfig(image_url_allowed_domains=("example.com", "*.example.org", "::1"))


@BOUNDED
@given(st.one_of(_any_text, st.builds(lambda s, h: f"{s}://{h}/a.png", st.sampled_from(["http", "https"]),
                                      _any_text)))
def test_check_image_url(url: str) -> None:
    _only_vlmserve_errors(check_image_url, url, _URL_CONFIG)
