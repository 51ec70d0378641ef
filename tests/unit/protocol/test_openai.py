"""ChatCompletionRequest: parsing, conversions to internal types, and the fields refused with 400."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.openai import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    DeltaMessage,
    ModelPermission,
)
from vlmserve.protocol.types import ChatMessage, ImagePart, SamplingParams, TextPart

USER = {"role": "user", "content": "hi"}


def parse(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [USER], **fields})


def test_defaults_follow_the_contract() -> None:
    params = parse().to_sampling_params()
    assert params == SamplingParams(temperature=1.0, top_p=0.01, top_k=-1, max_tokens=1024)


def test_null_scalars_mean_the_default() -> None:
    request = parse(temperature=None, top_p=None, n=None, max_tokens=None, stream=None, logprobs=None)
    assert request.to_sampling_params() == parse().to_sampling_params()
    assert request.num_choices == 1


def test_sampling_params_carry_every_field() -> None:
    request = parse(
        temperature=0,
        top_p=0.5,
        max_tokens=7,
        seed=-3,
        stop="END",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=True,
        top_logprobs=3,
        nvext={"top_k": 5, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    assert request.to_sampling_params() == SamplingParams(
        temperature=0.0,
        top_p=0.5,
        top_k=5,
        max_tokens=7,
        seed=-3,
        stop=("END",),
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=3,
    )


def test_logprobs_without_top_logprobs_is_zero_alternatives() -> None:
    assert parse(logprobs=True).to_sampling_params().logprobs == 0
    assert parse(logprobs=False).to_sampling_params().logprobs is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse(max_tokens=10, max_completion_tokens=20).to_sampling_params().max_tokens == 20
    assert parse(max_completion_tokens=20).to_sampling_params().max_tokens == 20
    assert parse().to_sampling_params(default_max_tokens=99).max_tokens == 99


def test_stop_list_drops_empty_strings() -> None:
    assert parse(stop=["a", "", "b"]).to_sampling_params().stop == ("a", "b")


def test_seed_accepts_the_int64_range() -> None:
    assert parse(seed=INT64_MIN).seed == INT64_MIN
    assert parse(seed=INT64_MAX).seed == INT64_MAX
    with pytest.raises(ValidationError):
        parse(seed=INT64_MAX + 1)


def test_to_chat_messages_converts_parts() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"},
                        },
                        {"type": "text", "text": "what is it?"},
                    ],
                },
                {"role": "assistant", "content": None},
            ]
        }
    )
    assert request.is_completion_mode
    assert request.to_chat_messages() == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(
            role="user",
            content=[ImagePart(url="data:image/png;base64,AA==", detail="low"), TextPart(text="what is it?")],
        ),
        ChatMessage(role="assistant", content=None),
    ]


def test_unknown_fields_are_ignored() -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{**USER, "extra": 1}], "not_a_field": True, "nvext": {"nope": 1}}
    )
    assert request.to_sampling_params() == parse().to_sampling_params()


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "tool calling is not offered",
        ),
        ({"tool_choice": "required"}, "tool_choice", "tool calling is not offered"),
        ({"logit_bias": {"-1": 1.0}}, "logit_bias", "'-1' is not a token id"),
        ({"logit_bias": {"4x": 1.0}}, "logit_bias", "'4x' is not a token id"),
        ({"logit_bias": {"42": -100.5}}, "logit_bias", "outside [-100, 100]"),
    ],
)
def test_unsupported_fields_are_refused(fields: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse(**fields).check_supported()
    assert caught.value.param == param
    assert needle in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": []},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"logit_bias": {}},
        {"logit_bias": {"42": 1.0, " 7": -100}},
        {"response_format": {"type": "text"}},
    ],
)
def test_harmless_forms_are_accepted(fields: dict[str, Any]) -> None:
    parse(**fields).check_supported()


def test_logit_bias_and_min_p_reach_the_sampling_params() -> None:
    params = parse(logit_bias={"42": 1.5, "7": -100}, nvext={"min_p": 0.2}).to_sampling_params()
    assert params.logit_bias == ((7, -100.0), (42, 1.5))
    assert params.min_p == 0.2


def test_chunk_serialises_only_what_is_set() -> None:
    chunk = ChatCompletionChunk(
        id="chat-x",
        created=1,
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="a"))],
    )
    assert chunk.model_dump() == {
        "id": "chat-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "a"},
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
            }
        ],
    }
    empty = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")
    assert empty.model_dump()["delta"] == {}


def test_model_permission_defaults_match_nim() -> None:
    assert ModelPermission(id="modelperm-0", created=5).model_dump() == {
        "id": "modelperm-0",
        "object": "model_permission",
        "created": 5,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
