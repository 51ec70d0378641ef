"""Property tests for the request parser: on any JSON-ish input, ChatCompletionRequest validation and
the conversions the server calls next raise only pydantic's ValidationError or our VLMServeError."""

from __future__ import annotations

from typing import Any

import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmserve.errors import VLMServeError
from vlmserve.protocol.openai import ChatCompletionRequest

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "USER"])
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | json_values}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {
                    "url": st.sampled_from(["data:image/png;base64,AAAA", "http://x/a.png", "", "x"])
                    | json_values
                },
                optional={"detail": st.sampled_from(["auto", "low", "high", "medium"]) | json_values},
            )
            | json_values,
        }
    ),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": ROLES | json_values},
        optional={"content": st.text(max_size=30) | st.lists(parts, max_size=3) | json_values},
    )
    | json_values,
    max_size=5,
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.text(max_size=10) | json_values,
    "messages": messages,
    "temperature": st.floats() | json_values,
    "top_p": st.floats() | json_values,
    "max_tokens": st.integers() | json_values,
    "max_completion_tokens": st.integers() | json_values,
    "seed": st.integers() | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | json_values,
    "n": st.integers(-2, 20) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": st.integers(-2, 30) | json_values,
    "frequency_penalty": st.floats() | json_values,
    "presence_penalty": st.floats() | json_values,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "x"])},
        optional={"json_schema": json_values},
    )
    | json_values,
    "tools": json_values,
    "tool_choice": json_values,
    "user": json_values,
    "nvext": st.fixed_dictionaries(
        {},
        optional={
            key: json_values | st.integers(-3, 3) | st.floats(-3, 3)
            for key in (
                "top_k",
                "repetition_penalty",
                "ignore_eos",
                "guided_json",
                "guided_regex",
                "guided_choice",
                "guided_grammar",
            )
        },
    )
    | json_values,
}
bodies = st.fixed_dictionaries({}, optional=FIELDS) | json_values


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_parser_raises_only_validation_errors(body: Any) -> None:
    try:
        request = ChatCompletionRequest.model_validate(body)
        request.check_supported()
        request.to_chat_messages()
        request.to_sampling_params(16)
        _ = (request.is_completion_mode, request.num_choices, request.requested_max_tokens)
    except (pydantic.ValidationError, VLMServeError):
        pass


@settings(max_examples=200, deadline=None)
@given(
    body=st.fixed_dictionaries(
        {"messages": st.just([{"role": "user", "content": "hi"}])},
        optional={key: value for key, value in FIELDS.items() if key != "messages"},
    )
)
def test_parser_on_mostly_valid_requests(body: dict[str, Any]) -> None:
    test_parser_raises_only_validation_errors.hypothesis.inner_test(body)  # type: ignore[attr-defined]
