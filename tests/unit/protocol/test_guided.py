"""Structured-output fields of ChatCompletionRequest: what becomes SamplingParams.guided, and the 400s."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.openai import ChatCompletionRequest
from vlmserve.protocol.types import GuidedDecodingSpec

USER = {"role": "user", "content": "hi"}
SCHEMA = {
    "type": "object",
    "properties": {"b": {"type": "string"}, "a": {"type": "integer"}},
    "required": ["a"],
}


def guided(**fields: Any) -> GuidedDecodingSpec | None:
    request = ChatCompletionRequest.model_validate({"messages": [USER], **fields})
    request.check_supported()
    return request.to_sampling_params().guided


def refused(**fields: Any) -> InvalidRequestError:
    request = ChatCompletionRequest.model_validate({"messages": [USER], **fields})
    with pytest.raises(InvalidRequestError) as caught:
        request.check_supported()
    assert caught.value.status == 400
    return caught.value


def test_no_constraint_by_default() -> None:
    assert guided() is None
    assert guided(response_format={"type": "text"}) is None
    assert guided(nvext={"top_k": 3}) is None


def test_json_object() -> None:
    assert guided(response_format={"type": "json_object"}) == GuidedDecodingSpec("json_object", "")


def test_json_schema_keeps_key_order_and_ignores_strict() -> None:
    spec = guided(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": SCHEMA, "strict": False},
        }
    )
    assert spec == GuidedDecodingSpec("json", json.dumps(SCHEMA, separators=(",", ":")))
    assert spec is not None and spec.param == "response_format.json_schema.schema"
    assert list(json.loads(str(spec.value))["properties"]) == ["b", "a"]


@pytest.mark.parametrize("schema", [SCHEMA, json.dumps(SCHEMA, indent=2)], ids=["object", "string"])
def test_guided_json_object_or_string_give_the_same_spec(schema: Any) -> None:
    spec = guided(nvext={"guided_json": schema})
    assert spec == GuidedDecodingSpec("json", json.dumps(SCHEMA, separators=(",", ":")))
    assert spec is not None and spec.param == "nvext.guided_json"


def test_regex_choice_grammar() -> None:
    assert guided(nvext={"guided_regex": r"\d+"}) == GuidedDecodingSpec("regex", r"\d+")
    assert guided(nvext={"guided_choice": ["a", "b c"]}) == GuidedDecodingSpec("choice", ("a", "b c"))
    grammar = 'root ::= "x" | "y"'
    assert guided(nvext={"guided_grammar": grammar}) == GuidedDecodingSpec("grammar", grammar)


def test_guided_works_with_the_other_sampling_fields() -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [USER], "n": 2, "seed": 5, "stop": ["x"], "nvext": {"guided_choice": ["a"], "top_k": 4}}
    )
    request.check_supported()
    params = request.to_sampling_params()
    assert (
        params.guided == GuidedDecodingSpec("choice", ("a",)) and params.top_k == 4 and params.stop == ("x",)
    )


@pytest.mark.parametrize(
    ("fields", "param", "names"),
    [
        (
            {"response_format": {"type": "json_object"}, "nvext": {"guided_json": SCHEMA}},
            "nvext.guided_json",
            "response_format json_object and nvext.guided_json",
        ),
        (
            {
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
                "nvext": {"guided_choice": ["a"]},
            },
            "nvext.guided_choice",
            "response_format json_schema and nvext.guided_choice",
        ),
        (
            {"nvext": {"guided_regex": "a", "guided_grammar": "start: a"}},
            "nvext.guided_grammar",
            "nvext.guided_regex and nvext.guided_grammar",
        ),
        (
            {"nvext": {"guided_json": SCHEMA, "guided_choice": []}},
            "nvext.guided_choice",
            "nvext.guided_json and nvext.guided_choice",
        ),
    ],
)
def test_two_constraints_are_refused_naming_both(fields: dict[str, Any], param: str, names: str) -> None:
    error = refused(**fields)
    assert error.param == param
    assert error.message.startswith(f"{names} cannot be combined")


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
            "is required",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
            "response_format.json_schema.schema",
            "is required",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}},
            "response_format.json_schema.schema",
            "must be a JSON schema object, not list",
        ),
        ({"nvext": {"guided_json": "{not json"}}, "nvext.guided_json", "is not valid JSON"),
        ({"nvext": {"guided_json": "[1, 2]"}}, "nvext.guided_json", "must be a JSON schema object"),
        ({"nvext": {"guided_choice": []}}, "nvext.guided_choice", "at least one choice"),
        ({"nvext": {"guided_grammar": "  \n"}}, "nvext.guided_grammar", "is empty"),
    ],
)
def test_malformed_constraints_are_refused(fields: dict[str, Any], param: str, needle: str) -> None:
    error = refused(**fields)
    assert error.param == param
    assert needle in error.message
