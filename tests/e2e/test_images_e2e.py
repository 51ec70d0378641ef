"""Images through a real server: the three forms (data URL, http URL, <img> tag), the image token count
in usage.prompt_tokens, and every way an image can fail, each with its status and a message naming it."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import SLOW_RESPONSE_S, ImageHost, RunningServer, free_port
from tests.e2e.helpers import (
    MODEL,
    TEXT,
    data_url,
    expect_api_error,
    gif_bytes,
    image_token_count,
    jpeg_bytes,
    newline_token_count,
    png_bytes,
    png_claiming_size,
    user_text,
    user_with_images,
)


def _chat(sdk: openai.OpenAI, messages: list[dict], max_tokens: int = 2):
    return sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)


@pytest.fixture(scope="module")
def text_only_prompt_tokens(sdk: openai.OpenAI) -> int:
    return _chat(sdk, user_text()).usage.prompt_tokens


@pytest.fixture(scope="module")
def newline_tokens(tiny_checkpoint_dir: Path) -> int:
    return newline_token_count(tiny_checkpoint_dir)


# ------------------------------------------------------------------------------------------ forms


@pytest.mark.parametrize(
    ("media_type", "encode"),
    [("image/png", png_bytes), ("image/jpeg", jpeg_bytes), ("image/jpg", jpeg_bytes)],
)
def test_data_url_image_counts_its_tokens(
    sdk: openai.OpenAI, text_only_prompt_tokens: int, newline_tokens: int, media_type: str, encode
) -> None:
    """64x64 is one 64-pixel tile: <img> + 4 x <image> + </img>, then the newline the template adds."""
    response = _chat(sdk, user_with_images(data_url(encode(64, 64), media_type)))
    assert response.usage.prompt_tokens - text_only_prompt_tokens == image_token_count(1) + newline_tokens


@pytest.mark.parametrize(
    ("size", "num_tiles"),
    [
        ((64, 64), 1),  # one tile, no thumbnail
        ((128, 64), 3),  # 2x1 grid + thumbnail
        ((64, 128), 3),  # 1x2 grid + thumbnail
        ((128, 128), 5),  # 2x2 grid + thumbnail
    ],
)
def test_prompt_tokens_follow_the_tile_grid(
    sdk: openai.OpenAI,
    text_only_prompt_tokens: int,
    newline_tokens: int,
    size: tuple[int, int],
    num_tiles: int,
) -> None:
    response = _chat(sdk, user_with_images(data_url(png_bytes(*size))))
    expected = image_token_count(num_tiles) + newline_tokens
    assert response.usage.prompt_tokens - text_only_prompt_tokens == expected
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_four_images_are_allowed_and_all_counted(
    sdk: openai.OpenAI, text_only_prompt_tokens: int, newline_tokens: int
) -> None:
    urls = [data_url(png_bytes(64, 64, (10 * i, 0, 0))) for i in range(4)]
    response = _chat(sdk, user_with_images(*urls))
    # the images' newlines: "\n" + "\n" between images may merge, so count only the image tokens exactly
    extra = response.usage.prompt_tokens - text_only_prompt_tokens
    assert extra >= 4 * image_token_count(1) + newline_tokens
    assert extra <= 4 * (image_token_count(1) + newline_tokens)


def test_http_url_gives_the_same_prompt_and_answer_as_the_data_url(
    sdk: openai.OpenAI, image_host: ImageHost
) -> None:
    from_url = _chat(sdk, user_with_images(image_host.url("/wide.png")), max_tokens=6)
    from_data = _chat(sdk, user_with_images(data_url(png_bytes(128, 64))), max_tokens=6)
    assert image_host.requested("/wide.png")
    assert from_url.usage == from_data.usage
    assert from_url.choices[0].message.content == from_data.choices[0].message.content


def test_image_urls_stay_out_of_the_log(
    sdk: openai.OpenAI, image_host: ImageHost, server: RunningServer
) -> None:
    """Image URLs are request content (often signed): the fetch is not logged at the default level."""
    _chat(sdk, user_with_images(image_host.url("/red.png?signature=e2e-secret-4711")))
    assert image_host.requested("/red.png")
    assert "e2e-secret-4711" not in server.log()


def test_http_url_jpeg(sdk: openai.OpenAI, image_host: ImageHost, text_only_prompt_tokens: int) -> None:
    response = _chat(sdk, user_with_images(image_host.url("/photo.jpg")))
    assert response.usage.prompt_tokens > text_only_prompt_tokens + image_token_count(1) - 1


def test_img_tag_in_string_content_is_the_same_as_an_image_part(sdk: openai.OpenAI) -> None:
    """`<img src="data:...">TEXT` renders exactly like [image part, text part TEXT]."""
    url = data_url(png_bytes(128, 64))
    from_tag = _chat(sdk, [{"role": "user", "content": f'<img src="{url}" />{TEXT}'}], max_tokens=6)
    from_part = _chat(sdk, user_with_images(url), max_tokens=6)
    assert from_tag.usage == from_part.usage
    assert from_tag.choices[0].message.content == from_part.choices[0].message.content


def test_img_tag_keeps_the_text_around_it(sdk: openai.OpenAI) -> None:
    url = data_url(png_bytes(64, 64))
    one = _chat(sdk, [{"role": "user", "content": f'Look: <img src="{url}"> and tell me.'}])
    two = _chat(
        sdk, [{"role": "user", "content": f"Look: <img src=\"{url}\"> <img src='{url}'/> and tell me."}]
    )
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= image_token_count(1)


def test_img_tag_inside_a_text_part_is_not_parsed(sdk: openai.OpenAI) -> None:
    """A GIF in a tag would be refused with 415 if the tag were parsed; in a text part it is only text."""
    tag = f'<img src="{data_url(gif_bytes(4, 4), "image/gif")}" />'
    response = _chat(sdk, [{"role": "user", "content": [{"type": "text", "text": tag}]}])
    assert response.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.APIStatusError) as exc_info:
        _chat(sdk, [{"role": "user", "content": tag}])
    expect_api_error(exc_info, 415, "image/gif")


# ------------------------------------------------------------------------------------------ failures


def _fails(sdk: openai.OpenAI, url: str, status: int, *needles: str) -> dict:
    with pytest.raises(openai.APIStatusError) as exc_info:
        _chat(sdk, user_with_images(url))
    return expect_api_error(exc_info, status, *needles)


def test_bad_base64(sdk: openai.OpenAI) -> None:
    _fails(sdk, "data:image/png;base64,@@not*base64@@", 400, "base64")


def test_data_that_is_not_an_image(sdk: openai.OpenAI) -> None:
    payload = base64.b64encode(b"plain text pretending to be a picture").decode()
    _fails(sdk, f"data:image/png;base64,{payload}", 400, "not a PNG or JPEG")


def test_truncated_png(sdk: openai.OpenAI) -> None:
    _fails(sdk, data_url(png_bytes(64, 64)[:60]), 400, "PNG")


def test_gif_data_url_is_415(sdk: openai.OpenAI) -> None:
    _fails(sdk, data_url(gif_bytes(8, 8), "image/gif"), 415, "image/gif", "png")


def test_gif_bytes_under_a_png_type_are_415(sdk: openai.OpenAI) -> None:
    _fails(sdk, data_url(gif_bytes(8, 8), "image/png"), 415, "GIF")


def test_gif_url_is_415(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    _fails(sdk, image_host.url("/anim.gif"), 415, "GIF")


def test_url_that_is_not_an_image(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    _fails(sdk, image_host.url("/not-image.png"), 400, "not a PNG or JPEG")


def test_too_many_images(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    """5 images with the default limit of 4: refused before any of them is fetched."""
    urls = [image_host.url(f"/count-{i}.png") for i in range(5)]
    with pytest.raises(openai.BadRequestError) as exc_info:
        _chat(sdk, user_with_images(*urls))
    expect_api_error(exc_info, 400, "5 images", "at most 4")
    assert not any(image_host.requested(f"/count-{i}.png") for i in range(5))


def test_too_many_pixels(sdk: openai.OpenAI) -> None:
    """A tiny PNG whose header claims 3000x3000 = 9,000,000 pixels, over the server's 4,000,000."""
    _fails(sdk, data_url(png_claiming_size(3000, 3000)), 400, "3000x3000", "limit of 4000000")


def test_decompression_bomb_header(sdk: openai.OpenAI) -> None:
    _fails(sdk, data_url(png_claiming_size(100_000, 100_000)), 400, "pixels")


def test_fetch_timeout(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    started = time.monotonic()
    error = _fails(sdk, image_host.url("/slow.png"), 400, "timed out", "/slow.png")
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < SLOW_RESPONSE_S - 2, (elapsed, error)


def test_url_404(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    _fails(sdk, image_host.url("/missing.png"), 400, "HTTP 404", "/missing.png")


def test_url_connection_refused(sdk: openai.OpenAI) -> None:
    _fails(sdk, f"http://127.0.0.1:{free_port()}/nothing-listens.png", 400, "connection failed")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png"])
def test_url_scheme_other_than_http_is_refused(sdk: openai.OpenAI, url: str) -> None:
    _fails(sdk, url, 400, "scheme")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_loopback_url_is_refused_without_being_fetched(
    strict_sdk: openai.OpenAI, image_host: ImageHost, host: str
) -> None:
    """The default policy (no --allow-private-image-urls) refuses loopback before connecting."""
    path = f"/refused-{host.strip('[]').replace(':', '_')}.png"
    error = _fails(strict_sdk, image_host.url(path, host=host), 400, "refused address")
    assert "loopback" in error["message"]
    assert not image_host.requested(path)
