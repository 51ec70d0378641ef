from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from tests.unit.inputs.helpers import data_url, encode_image
from vlmserve.errors import ImageLoadError, UnsupportedMediaTypeError
from vlmserve.inputs.media import asset_reference, decode_data_url, decode_image, sniff_format, to_rgb

MAX_BYTES = 1 << 20
MAX_PIXELS = 10_000_000


def _png(width: int = 8, height: int = 6, color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    return encode_image(Image.new("RGB", (width, height), color))


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds only a tiny (invalid) IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "image/jpg", "IMAGE/PNG"])
def test_data_url_good(media_type: str) -> None:
    data = _png()
    assert decode_data_url(data_url(data, media_type), max_bytes=MAX_BYTES) == data


def test_data_url_tolerates_whitespace_and_missing_padding() -> None:
    data = _png()
    encoded = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", max_bytes=MAX_BYTES) == data


def test_data_url_bad_base64_is_400() -> None:
    with pytest.raises(ImageLoadError, match="not valid base64"):
        decode_data_url("data:image/png;base64,iVBOR***w0KGgo=", max_bytes=MAX_BYTES)


@pytest.mark.parametrize("media_type", ["image/gif", "image/webp", "text/plain"])
def test_data_url_other_media_types_are_415(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match=media_type):
        decode_data_url(data_url(_png(), media_type), max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    "url",
    ["data:image/png,rawbytes", "image/png;base64,AAAA", "data:image/png;base64", "data:image/png;base64,"],
)
def test_data_url_malformed_is_400(url: str) -> None:
    with pytest.raises(ImageLoadError):
        decode_data_url(url, max_bytes=MAX_BYTES)


def test_asset_reference_is_not_decoded_as_base64() -> None:
    with pytest.raises(ImageLoadError, match="asset"):
        decode_data_url("data:image/png;asset_id,1234-abcd", max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    ("url", "asset_id"),
    [
        ("data:image/png;asset_id,1234-abcd", "1234-abcd"),
        ("DATA:image/jpeg; Asset_ID , 1234-abcd ", "1234-abcd"),
        ("data:image/webp;asset_id,x", "x"),  # any image subtype: the stored bytes decide
        ("data:image/png;base64,AAAA", None),
        ("http://example.com/a.png;asset_id,x", None),
        ("data:image/png;asset_id", None),  # no comma: not a data URL at all (decode_data_url says why)
    ],
)
def test_asset_reference(url: str, asset_id: str | None) -> None:
    assert asset_reference(url) == asset_id


def test_asset_reference_errors() -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="text/plain"):
        asset_reference("data:text/plain;asset_id,1234")
    with pytest.raises(ImageLoadError, match="no asset id"):
        asset_reference("data:image/png;asset_id,  ")


def test_data_url_too_big_is_400() -> None:
    data = _png(300, 300) + b"\x00" * 5000
    with pytest.raises(ImageLoadError, match="bytes"):
        decode_data_url(data_url(data), max_bytes=len(data) - 1)
    assert decode_data_url(data_url(data), max_bytes=len(data)) == data


def test_decode_png_and_jpeg() -> None:
    png = decode_image(_png(8, 6), max_pixels=MAX_PIXELS)
    assert png.mode == "RGB" and png.size == (8, 6) and png.getpixel((0, 0)) == (10, 20, 30)
    jpeg = decode_image(encode_image(Image.new("RGB", (16, 8), (0, 255, 0)), "JPEG"), max_pixels=MAX_PIXELS)
    assert jpeg.mode == "RGB" and jpeg.size == (16, 8)


@pytest.mark.parametrize("image_format", ["GIF", "WEBP", "BMP", "TIFF"])
def test_decode_other_formats_are_415_naming_the_format(image_format: str) -> None:
    data = encode_image(Image.new("RGB", (4, 4)), image_format)
    assert sniff_format(data) == image_format
    with pytest.raises(UnsupportedMediaTypeError, match=image_format):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_png_labelled_data_url_holding_gif_is_415() -> None:
    gif = encode_image(Image.new("RGB", (4, 4)), "GIF")
    data = decode_data_url(data_url(gif, "image/png"), max_bytes=MAX_BYTES)
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_not_an_image_is_400() -> None:
    with pytest.raises(ImageLoadError, match="not a PNG or JPEG"):
        decode_image(b"hello, this is text", max_pixels=MAX_PIXELS)


def test_truncated_image_is_400() -> None:
    data = encode_image(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageLoadError):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


def test_pixel_cap_refused_from_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_with_header_size(30_000, 30_000)  # 900 Mpx claimed in a few dozen bytes
    assert len(data) < 100

    def no_load(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_load)
    with pytest.raises(ImageLoadError, match="pixels"):
        decode_image(data, max_pixels=MAX_PIXELS)
    small_claim = _png_with_header_size(4000, 3000)  # 12 Mpx: over our cap, under Pillow's own guard
    with pytest.raises(ImageLoadError, match="12000000 pixels"):
        decode_image(small_claim, max_pixels=MAX_PIXELS)


def test_rgba_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    image.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black -> grey
    decoded = decode_image(encode_image(image), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in decoded.getpixel((2, 0)))


def test_la_and_palette_transparency_are_flattened_onto_white() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    assert decode_image(encode_image(la), max_pixels=MAX_PIXELS).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((1, 0)) == (255, 0, 0)


def test_grey_and_cmyk_become_rgb() -> None:
    assert to_rgb(Image.new("L", (1, 1), 100)).getpixel((0, 0)) == (100, 100, 100)
    cmyk = decode_image(encode_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), max_pixels=MAX_PIXELS)
    assert cmyk.mode == "RGB"
