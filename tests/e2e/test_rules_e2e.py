"""CONTRACT.md's request rules once more through the real server and the SDK (each rule's every case is
unit-tested in tests/unit/server/test_validation.py): status, error shape, a message naming the rule.
Also the context length, against the long-context server and the 64-token one."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import STRICT_MAX_MODEL_LEN
from tests.e2e.helpers import MODEL, data_url, expect_api_error, png_bytes, user_text, user_with_images

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
SYSTEM = {"role": "system", "content": "be brief"}

# (create() keyword arguments over a valid request, status, needles in the message)
RULES: dict[str, tuple[dict[str, Any], int, tuple[str, ...]]] = {
    "messages empty": ({"messages": []}, 422, ("messages", "at least 1")),
    "two users in a row": ({"messages": [USER, USER]}, 422, ("messages.1.role", "alternate")),
    "assistant first": ({"messages": [ASSISTANT, USER]}, 422, ("messages.0.role",)),
    "system not first": ({"messages": [USER, SYSTEM]}, 422, ("messages.1.role", "first")),
    "last message system": ({"messages": [SYSTEM]}, 422, ("messages.0.role", "last message")),
    "image in an assistant message": (
        {"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
        422,
        ("messages.1.content", "only for user"),
    ),
    "empty user content": ({"messages": [{"role": "user", "content": ""}]}, 422, ("messages.0.content",)),
    "temperature 1.5": ({"temperature": 1.5}, 422, ("temperature", "less than or equal to 1")),
    "temperature -1": ({"temperature": -1}, 422, ("temperature", "greater than or equal to 0")),
    "top_p 0": ({"top_p": 0}, 422, ("top_p", "greater than 0")),
    "max_tokens 0": ({"max_tokens": 0}, 422, ("max_tokens", "greater than or equal to 1")),
    "max_tokens 2049": ({"max_tokens": 2049}, 422, ("max_tokens", "less than or equal to 2048")),
    "seed over int64": ({"seed": 2**63}, 422, ("seed",)),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, 422, ("top_logprobs", "20")),
    "nvext.top_k 0": ({"extra_body": {"nvext": {"top_k": 0}}}, 422, ("nvext.top_k",)),
    "unknown model": ({"model": "gpt-4o"}, 404, ("gpt-4o", "does not exist")),
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        400,
        ("tool calling is not offered",),
    ),
}


def _request(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": user_text(), "max_tokens": 2, "temperature": 0, **overrides}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule(sdk: openai.OpenAI, rule: str) -> None:
    overrides, status, needles = RULES[rule]
    with pytest.raises(openai.APIStatusError) as exc_info:
        sdk.chat.completions.create(**_request(**overrides))
    expect_api_error(exc_info, status, *needles)


@pytest.mark.parametrize("rule", ["two users in a row", "max_tokens 2049", "unknown model", "tools"])
def test_rule_when_streaming(sdk: openai.OpenAI, rule: str) -> None:
    """A stream that cannot start is an error status, not an event stream."""
    overrides, status, needles = RULES[rule]
    with pytest.raises(openai.APIStatusError) as exc_info:
        sdk.chat.completions.create(**_request(**overrides), stream=True)
    expect_api_error(exc_info, status, *needles)


def test_sdk_exception_classes(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.chat.completions.create(**_request(temperature=2))
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(**_request(model="nope"))
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(**_request(tools=RULES["tools"][0]["tools"]))


def test_prompt_plus_max_tokens_over_the_context(sdk: openai.OpenAI) -> None:
    """The tiny model's context is 4096: ~2100 prompt tokens + 2048 is over it."""
    with pytest.raises(openai.BadRequestError) as exc_info:
        sdk.chat.completions.create(**_request(messages=user_text("word " * 2100), max_tokens=2048))
    expect_api_error(exc_info, 400, "maximum context length is 4096", "2048 in max_tokens")


def test_small_context_server(strict_sdk: openai.OpenAI) -> None:
    """--max-model-len 64: a short prompt with max_tokens 40 is over; images count toward it; without
    max_tokens the default shrinks to what fits."""
    plain = strict_sdk.chat.completions.create(**_request(messages=user_text(), max_tokens=1))
    prompt_tokens = plain.usage.prompt_tokens
    assert prompt_tokens + 40 > STRICT_MAX_MODEL_LEN

    with pytest.raises(openai.BadRequestError) as exc_info:
        strict_sdk.chat.completions.create(**_request(max_tokens=40))
    expect_api_error(exc_info, 400, f"maximum context length is {STRICT_MAX_MODEL_LEN}", "40 in max_tokens")

    # 128x128 is 5 tiles = 22 image tokens: with 16 more tokens to generate it no longer fits
    image_messages = user_with_images(data_url(png_bytes(128, 128)))
    assert prompt_tokens + 16 <= STRICT_MAX_MODEL_LEN < prompt_tokens + 22 + 16
    strict_sdk.chat.completions.create(**_request(max_tokens=16))
    with pytest.raises(openai.BadRequestError) as exc_info:
        strict_sdk.chat.completions.create(**_request(messages=image_messages, max_tokens=16))
    expect_api_error(exc_info, 400, "images included")

    fitted = strict_sdk.chat.completions.create(
        model=MODEL, messages=user_text(), temperature=0, extra_body={"nvext": {"ignore_eos": True}}
    )
    assert fitted.usage.total_tokens == STRICT_MAX_MODEL_LEN
    assert fitted.choices[0].finish_reason == "length"
