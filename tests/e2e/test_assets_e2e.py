"""Image assets through a real server: upload (raw body and multipart), look-up, delete, use in an
image_url part and an <img> tag with the NVCF-INPUT-ASSET-REFERENCES header, reuse, the header's
rules, and the store's limits (size 413, type 415, expiry on a server with a one-second TTL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import RunningServer, start_server, stop_server, wait_ready
from tests.e2e.helpers import (
    MODEL,
    TEXT,
    check_error_body,
    data_url,
    expect_api_error,
    gif_bytes,
    jpeg_bytes,
    png_bytes,
    user_with_images,
)

HEADER = "NVCF-INPUT-ASSET-REFERENCES"
SHORT_TTL_S = 1
SMALL_ASSET_BYTES = 4096


def asset_url(asset_id: str) -> str:
    return f"data:image/png;asset_id,{asset_id}"


def upload(base_url: str, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/assets", content=data, headers={"Content-Type": content_type}, timeout=30
    )


def uploaded(base_url: str, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    response = upload(base_url, data, content_type)
    assert response.status_code == 201, response.text
    return response.json()


def chat(base_url: str, messages: list[dict[str, Any]], references: str | None = None) -> httpx.Response:
    headers = {HEADER: references} if references is not None else {}
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def base_url(server: RunningServer) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def red_asset(base_url: str) -> dict[str, Any]:
    return uploaded(base_url, png_bytes(64, 64))


@pytest.fixture(scope="module")
def inline_prompt_tokens(sdk: openai.OpenAI) -> int:
    """prompt_tokens of the same 64x64 image sent inline: an asset must count the same."""
    response = sdk.chat.completions.create(
        model=MODEL, messages=user_with_images(data_url(png_bytes(64, 64))), max_tokens=1, temperature=0
    )
    return response.usage.prompt_tokens


# ------------------------------------------------------------------------------------------ upload


def test_raw_upload_answers_201_with_the_asset_and_get_returns_it(base_url: str) -> None:
    before = int(time.time())
    data = png_bytes(64, 64)
    response = upload(base_url, data)
    assert response.status_code == 201, response.text
    asset = response.json()
    assert set(asset) == {"id", "object", "bytes", "content_type", "created_at", "expires_at"}
    assert str(uuid.UUID(asset["id"])) == asset["id"]
    assert asset["object"] == "asset"
    assert asset["bytes"] == len(data)
    assert asset["content_type"] == "image/png"
    assert before - 1 <= asset["created_at"] <= time.time() + 1
    # the default TTL is an hour
    assert asset["expires_at"] - asset["created_at"] == pytest.approx(3600, abs=1)
    fetched = httpx.get(f"{base_url}/v1/assets/{asset['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == asset


def test_multipart_upload_takes_the_file_field(base_url: str) -> None:
    data = jpeg_bytes(64, 64)
    response = httpx.post(f"{base_url}/v1/assets", files={"file": ("photo.jpg", data, "image/jpeg")})
    assert response.status_code == 201, response.text
    asset = response.json()
    assert asset["content_type"] == "image/jpeg"
    assert asset["bytes"] == len(data)


def test_octet_stream_upload_takes_its_type_from_the_bytes(base_url: str) -> None:
    asset = uploaded(base_url, jpeg_bytes(32, 32), "application/octet-stream")
    assert asset["content_type"] == "image/jpeg"


def test_multipart_upload_without_a_file_field_is_400(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/assets", files={"image": ("a.png", png_bytes(8, 8), "image/png")})
    check_error_body(response, 400, "file")


@pytest.mark.parametrize(
    ("data", "content_type", "needle"),
    [
        (b"just some text", "text/plain", "text/plain"),
        (gif_bytes(16, 16), "application/octet-stream", "GIF"),
        (b"not an image at all", "image/png", "PNG or JPEG"),
    ],
    ids=["text-type", "gif-bytes", "text-bytes-claiming-png"],
)
def test_upload_of_anything_but_png_or_jpeg_is_415(
    base_url: str, data: bytes, content_type: str, needle: str
) -> None:
    check_error_body(upload(base_url, data, content_type), 415, needle)


def test_unknown_asset_is_404_on_get_and_delete(base_url: str) -> None:
    unknown = str(uuid.uuid4())
    check_error_body(httpx.get(f"{base_url}/v1/assets/{unknown}"), 404, unknown, "does not exist")
    check_error_body(httpx.delete(f"{base_url}/v1/assets/{unknown}"), 404, unknown)


# ------------------------------------------------------------------------------------------ use in chat


def test_asset_in_an_image_url_part_counts_as_the_same_image_inline(
    sdk: openai.OpenAI, red_asset: dict[str, Any], inline_prompt_tokens: int
) -> None:
    response = sdk.chat.completions.create(
        model=MODEL,
        messages=user_with_images(asset_url(red_asset["id"])),
        max_tokens=1,
        temperature=0,
        extra_headers={HEADER: red_asset["id"]},
    )
    assert response.usage.prompt_tokens == inline_prompt_tokens


def test_asset_in_an_img_tag_resolves(
    base_url: str, red_asset: dict[str, Any], inline_prompt_tokens: int
) -> None:
    content = f'<img src="{asset_url(red_asset["id"])}" />{TEXT}'
    response = chat(base_url, [{"role": "user", "content": content}], references=red_asset["id"])
    assert response.status_code == 200, response.text
    # the tag form puts the same tokens in the same place as the part form (image, newline, text)
    assert response.json()["usage"]["prompt_tokens"] == inline_prompt_tokens


def test_an_asset_is_reused_across_requests_and_within_one(base_url: str, red_asset: dict[str, Any]) -> None:
    one = chat(base_url, user_with_images(asset_url(red_asset["id"])), references=red_asset["id"])
    two = chat(
        base_url,
        user_with_images(asset_url(red_asset["id"]), asset_url(red_asset["id"])),
        references=f"{red_asset['id'].upper()} , {uuid.uuid4()},",
    )
    assert one.status_code == 200, one.text
    assert two.status_code == 200, two.text
    assert two.json()["usage"]["prompt_tokens"] > one.json()["usage"]["prompt_tokens"]
    assert httpx.get(f"{base_url}/v1/assets/{red_asset['id']}").status_code == 200


def test_an_asset_not_listed_in_the_header_is_400_naming_it(base_url: str, red_asset: dict[str, Any]) -> None:
    other = uploaded(base_url, png_bytes(16, 16))
    messages = user_with_images(asset_url(red_asset["id"]))
    error = check_error_body(chat(base_url, messages, references=other["id"]), 400, red_asset["id"], HEADER)
    assert error["param"] == HEADER
    check_error_body(chat(base_url, messages), 400, red_asset["id"], "not listed")


def test_an_unknown_asset_is_400(base_url: str) -> None:
    unknown = str(uuid.uuid4())
    check_error_body(
        chat(base_url, user_with_images(asset_url(unknown)), references=unknown),
        400,
        unknown,
        "does not exist",
    )


def test_a_header_item_that_is_no_asset_id_is_400(base_url: str, red_asset: dict[str, Any]) -> None:
    response = chat(base_url, user_with_images(asset_url(red_asset["id"])), references="picture.png")
    assert check_error_body(response, 400, "picture.png", "UUID")["param"] == HEADER


def test_a_deleted_asset_is_400_in_chat_and_404_after(base_url: str) -> None:
    asset = uploaded(base_url, png_bytes(24, 24))
    deleted = httpx.delete(f"{base_url}/v1/assets/{asset['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": asset["id"], "object": "asset", "deleted": True}
    response = chat(base_url, user_with_images(asset_url(asset["id"])), references=asset["id"])
    check_error_body(response, 400, asset["id"], "was deleted")
    check_error_body(httpx.get(f"{base_url}/v1/assets/{asset['id']}"), 404, "was deleted")
    check_error_body(httpx.delete(f"{base_url}/v1/assets/{asset['id']}"), 404, asset["id"])


def test_sdk_sees_asset_errors_as_400(sdk: openai.OpenAI) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(openai.BadRequestError) as exc_info:
        sdk.chat.completions.create(
            model=MODEL,
            messages=user_with_images(asset_url(unknown)),
            max_tokens=1,
            extra_headers={HEADER: unknown},
        )
    expect_api_error(exc_info, 400, unknown)


# ------------------------------------------------------------------------------------------ limits


@pytest.fixture(scope="module", autouse=True)
def _short_ttl_launch(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_dir: Path
) -> Iterator[RunningServer]:
    """The tiny checkpoint with assets kept one second and at most 4 KiB each. Launched when the
    module starts, so that it boots while the tests before the limit tests run."""
    args = [
        *("--model", str(tiny_checkpoint_dir)),
        *("--served-model-name", MODEL),
        *("--dtype", "float32"),
        *("--num-threads", "1"),
        *("--asset-ttl-seconds", str(SHORT_TTL_S)),
        *("--asset-max-bytes", str(SMALL_ASSET_BYTES)),
    ]
    running = start_server(args, tmp_path_factory.mktemp("short-ttl") / "server.log")
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def short_ttl_server(_short_ttl_launch: RunningServer) -> RunningServer:
    wait_ready(_short_ttl_launch)
    return _short_ttl_launch


def test_an_asset_over_the_size_limit_is_413(short_ttl_server: RunningServer) -> None:
    big = png_bytes(400, 400, color=(1, 2, 3)) + bytes(SMALL_ASSET_BYTES)
    error = check_error_body(upload(short_ttl_server.base_url, big), 413, str(SMALL_ASSET_BYTES))
    assert error["type"] == "PayloadTooLargeError"
    multipart = httpx.post(
        f"{short_ttl_server.base_url}/v1/assets", files={"file": ("big.png", big, "image/png")}
    )
    check_error_body(multipart, 413, str(SMALL_ASSET_BYTES))


def test_an_expired_asset_is_gone(short_ttl_server: RunningServer) -> None:
    base = short_ttl_server.base_url
    asset = uploaded(base, png_bytes(16, 16))
    assert asset["expires_at"] - asset["created_at"] in (SHORT_TTL_S, SHORT_TTL_S + 1)
    time.sleep(SHORT_TTL_S + 0.2)
    response = chat(base, user_with_images(asset_url(asset["id"])), references=asset["id"])
    check_error_body(response, 400, asset["id"], "expired")
    check_error_body(httpx.get(f"{base}/v1/assets/{asset['id']}"), 404, "expired")
