"""Tokenize, detokenize and render through a real server, and per-image detail.

Render must report exactly the prompt a chat request runs: its token count equals usage.prompt_tokens
of the same request run for real, text-only and with images. The tiny checkpoint cuts images into
64-pixel tiles of 4 tokens: a 128x64 image is 2 tiles + a thumbnail at detail high, 1 tile at low.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import RunningServer
from tests.e2e.helpers import (
    MODEL,
    TEXT,
    TOKENS_PER_TILE,
    check_error_body,
    data_url,
    image_token_count,
    jpeg_bytes,
    png_bytes,
    user_text,
    user_with_images,
)


@pytest.fixture(scope="module")
def base_url(server: RunningServer) -> str:
    return server.base_url


def post(base_url: str, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=60, **kwargs)


def chat_usage(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = post(base_url, "/v1/chat/completions", {**body, "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def render(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = post(base_url, "/v1/chat/completions/render", body)
    assert response.status_code == 200, response.text
    return response.json()


def image_with_detail(url: str, detail: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


# ------------------------------------------------------------------------------------------ render


def test_render_of_text_equals_usage_and_tokenize(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, *user_text()]}
    rendered = render(base_url, body)
    assert set(rendered) == {"prompt", "prompt_token_ids", "num_prompt_tokens", "num_image_tokens", "images"}
    assert rendered["num_prompt_tokens"] == chat_usage(base_url, body)["prompt_tokens"]
    assert rendered["num_prompt_tokens"] == len(rendered["prompt_token_ids"])
    assert (rendered["num_image_tokens"], rendered["images"]) == (0, [])
    assert "Be brief." in rendered["prompt"] and TEXT in rendered["prompt"]
    tokenized = post(base_url, "/tokenize", {"model": MODEL, "messages": body["messages"]}).json()
    assert tokenized["tokens"] == rendered["prompt_token_ids"]
    # the rendered text is what the model sees: tokenizing it as is gives the same ids
    again = post(base_url, "/tokenize", {"prompt": rendered["prompt"], "add_special_tokens": False}).json()
    assert again["tokens"] == rendered["prompt_token_ids"]


def test_render_with_images_equals_usage(base_url: str) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 64))}},
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(128, 64))}},
                {"type": "text", "text": TEXT},
            ],
        },
        {"role": "assistant", "content": "Both are red."},
        {"role": "user", "content": f'And this? <img src="{data_url(jpeg_bytes(64, 64), "image/jpeg")}" />'},
    ]
    body = {"model": MODEL, "messages": messages}
    rendered = render(base_url, body)
    assert rendered["num_prompt_tokens"] == chat_usage(base_url, body)["prompt_tokens"]
    assert rendered["images"] == [
        {"num_tiles": 1, "num_tokens": image_token_count(1)},
        {"num_tiles": 3, "num_tokens": image_token_count(3)},
        {"num_tiles": 1, "num_tokens": image_token_count(1)},
    ]
    assert rendered["num_image_tokens"] == image_token_count(1) * 2 + image_token_count(3)
    prompt = rendered["prompt"]
    assert prompt.count("<img>") == 3 and prompt.count("</img>") == 3
    assert prompt.count("<image>") == 5 * TOKENS_PER_TILE
    assert "<img>" + "<image>" * 3 * TOKENS_PER_TILE + "</img>" in prompt
    assert "vlmserve-image" not in prompt and "base64" not in prompt
    again = post(base_url, "/tokenize", {"prompt": prompt, "add_special_tokens": False}).json()
    assert again["tokens"] == rendered["prompt_token_ids"]


def test_render_of_completion_mode_equals_usage(base_url: str) -> None:
    body = {"messages": [*user_text(), {"role": "assistant", "content": "It is"}]}
    rendered = render(base_url, body)
    assert rendered["prompt"].endswith("It is")
    assert rendered["num_prompt_tokens"] == chat_usage(base_url, body)["prompt_tokens"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "no-such-model", "messages": user_text()}, 404, "no-such-model"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages.0.role"),
        ({"messages": user_text(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool"),
        ({"messages": user_with_images("data:image/png;base64,!!!")}, 400, "base64"),
        ({"messages": user_text(), "max_tokens": 2048, "max_completion_tokens": 2048}, None, None),
    ],
    ids=["unknown-model", "role-order", "tools", "bad-image", "fits"],
)
def test_render_applies_the_chat_rules(
    base_url: str, body: dict[str, Any], status: int | None, needle: str | None
) -> None:
    response = post(base_url, "/v1/chat/completions/render", body)
    if status is None:
        assert response.status_code == 200, response.text
        return
    check_error_body(response, status, needle or "")


def test_render_refuses_a_prompt_over_the_context(base_url: str) -> None:
    max_model_len = httpx.get(base_url + "/v1/models").json()["data"][0]["max_model_len"]
    # ~1 token per repetition of " a"; enough that any max_tokens overflows
    body = {"messages": user_text(" a" * (2 * max_model_len))}
    check_error_body(post(base_url, "/v1/chat/completions/render", body), 400, "context length")


# ------------------------------------------------------------------------------------------ detail


def test_detail_low_and_high_change_prompt_tokens_by_the_tiles(base_url: str) -> None:
    url = data_url(png_bytes(128, 64))
    bodies = {
        detail: {
            "messages": [
                {"role": "user", "content": [image_with_detail(url, detail), {"type": "text", "text": TEXT}]}
            ]
        }
        for detail in ("low", "high", "auto")
    }
    usage = {detail: chat_usage(base_url, body)["prompt_tokens"] for detail, body in bodies.items()}
    # high: 2 tiles + thumbnail = 3 tiles; low: the whole image as 1 tile; auto: the default (high)
    assert usage["high"] - usage["low"] == (3 - 1) * TOKENS_PER_TILE
    assert usage["auto"] == usage["high"]
    rendered = {detail: render(base_url, body) for detail, body in bodies.items()}
    assert [rendered[d]["images"][0]["num_tiles"] for d in ("low", "high", "auto")] == [1, 3, 3]
    assert all(rendered[d]["num_prompt_tokens"] == usage[d] for d in usage)


# ------------------------------------------------------------------------------------------ tokenize


def test_tokenize_and_detokenize_round_trip(base_url: str) -> None:
    text = "Hello world, how are you? Ünïcödé ✓"
    tokenized = post(base_url, "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert set(body) == {"count", "max_model_len", "tokens"}
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == httpx.get(base_url + "/v1/models").json()["data"][0]["max_model_len"]
    detokenized = post(base_url, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert detokenized.status_code == 200, detokenized.text
    assert detokenized.json() == {"prompt": text}


def test_tokenize_token_strs(base_url: str) -> None:
    body = post(base_url, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert len(body["token_strs"]) == body["count"]
    assert all(isinstance(token, str) for token in body["token_strs"])


def test_tokenize_messages_with_images_counts_like_chat(base_url: str) -> None:
    messages = user_with_images(data_url(png_bytes(128, 64)))
    tokenized = post(base_url, "/tokenize", {"messages": messages, "add_generation_prompt": True}).json()
    assert tokenized["count"] == chat_usage(base_url, {"messages": messages})["prompt_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "other"),
        ("/tokenize", {"prompt": 3}, 422, "prompt"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, 422, "messages.0.role"),
        (
            "/tokenize",
            {"messages": user_text(), "continue_final_message": True},
            422,
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            {"messages": user_text(), "continue_final_message": True, "add_generation_prompt": False},
            400,
            "assistant",
        ),
        (
            "/tokenize",
            {"messages": user_text(), "add_generation_prompt": False},
            400,
            "add_generation_prompt",
        ),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens.1"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens.0"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "other"),
    ],
)
def test_tokenize_errors(base_url: str, path: str, body: dict[str, Any], status: int, needle: str) -> None:
    check_error_body(post(base_url, path, body), status, needle)
