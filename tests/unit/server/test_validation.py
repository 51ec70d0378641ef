"""Every request rule of CONTRACT.md, over HTTP: the status, and a message naming the field and the rule."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.unit.server.helpers import MODEL, FakeEngine, assert_error, chat_body

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
PARTS = [{"type": "text", "text": "hi"}]
GE = "greater than or equal to"
LE = "less than or equal to"


def messages(*items: dict[str, Any]) -> dict[str, Any]:
    return chat_body(messages=list(items))


# (body, status, param, needles in the message)
RULES: dict[str, tuple[dict[str, Any], int, str | None, tuple[str, ...]]] = {
    "no messages": (messages(), 422, "messages", ("messages", "at least 1")),
    "1025 messages": (
        messages(*([USER, ASSISTANT] * 512), USER),
        422,
        "messages",
        ("messages", "at most 1024"),
    ),
    "messages missing": ({"model": MODEL}, 422, "messages", ("messages", "required")),
    "system not first": (messages(USER, SYSTEM), 422, "messages.1.role", ("messages.1.role", "first")),
    "two users in a row": (messages(USER, USER), 422, "messages.1.role", ("messages.1.role", "alternate")),
    "two assistants in a row": (
        messages(USER, ASSISTANT, ASSISTANT),
        422,
        "messages.2.role",
        ("messages.2.role", "alternate"),
    ),
    "assistant first": (messages(ASSISTANT, USER), 422, "messages.0.role", ("messages.0.role", "be user")),
    "assistant right after system": (
        messages(SYSTEM, ASSISTANT),
        422,
        "messages.1.role",
        ("messages.1.role", "must be user"),
    ),
    "last message system": (messages(SYSTEM), 422, "messages.0.role", ("messages.0.role", "last message")),
    "unknown role": (
        messages({"role": "tool", "content": "x"}),
        422,
        "messages.0.role",
        ("messages.0.role", "'system', 'user' or 'assistant'"),
    ),
    "list content for assistant": (
        messages(USER, {"role": "assistant", "content": PARTS}),
        422,
        "messages.1.content",
        ("messages.1.content", "only for user"),
    ),
    "list content for system": (
        messages({"role": "system", "content": PARTS}, USER),
        422,
        "messages.0.content",
        ("messages.0.content", "only for user"),
    ),
    "null content not last": (
        messages(USER, {"role": "assistant", "content": None}, USER),
        422,
        "messages.1.content",
        ("messages.1.content", "final assistant"),
    ),
    "null user content": (
        messages({"role": "user", "content": None}),
        422,
        "messages.0.content",
        ("messages.0.content", "final assistant"),
    ),
    "empty user content": (
        messages({"role": "user", "content": ""}),
        422,
        "messages.0.content",
        ("messages.0.content", "null or empty"),
    ),
    "content of wrong type": (
        messages({"role": "user", "content": 5}),
        422,
        "messages.0.content",
        ("messages.0.content", "string or a list"),
    ),
    "unknown part type": (
        messages({"role": "user", "content": [{"type": "audio"}]}),
        422,
        "messages.0.content.0",
        ("messages.0.content.0", "'text' or 'image_url'"),
    ),
    "bad image detail": (
        messages(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "hd"}}]}
        ),
        422,
        "messages.0.content.0.image_url.detail",
        ("messages.0.content.0.image_url.detail", "'auto', 'low' or 'high'"),
    ),
    "temperature -0.1": (chat_body(temperature=-0.1), 422, "temperature", ("temperature", GE + " 0")),
    "temperature 1.1": (chat_body(temperature=1.1), 422, "temperature", ("temperature", LE + " 1")),
    "temperature string": (chat_body(temperature="hot"), 422, "temperature", ("temperature", "valid number")),
    "top_p 0": (chat_body(top_p=0), 422, "top_p", ("top_p", "greater than 0")),
    "top_p 1.5": (chat_body(top_p=1.5), 422, "top_p", ("top_p", LE + " 1")),
    "max_tokens 0": (chat_body(max_tokens=0), 422, "max_tokens", ("max_tokens", GE + " 1")),
    "max_tokens 2049": (chat_body(max_tokens=2049), 422, "max_tokens", ("max_tokens", LE + " 2048")),
    "max_completion_tokens 0": (
        chat_body(max_completion_tokens=0),
        422,
        "max_completion_tokens",
        ("max_completion_tokens", GE + " 1"),
    ),
    "max_completion_tokens 2049": (
        chat_body(max_completion_tokens=2049),
        422,
        "max_completion_tokens",
        ("max_completion_tokens", LE + " 2048"),
    ),
    "seed over int64": (chat_body(seed=2**63), 422, "seed", ("seed", LE + " 9223372036854775807")),
    "seed under int64": (
        chat_body(seed=-(2**63) - 1),
        422,
        "seed",
        ("seed", GE + " -9223372036854775808"),
    ),
    "n 0": (chat_body(n=0), 422, "n", ("n:", GE + " 1")),
    "n 17": (chat_body(n=17), 422, "n", ("n:", LE + " 16")),
    "top_logprobs 21": (
        chat_body(logprobs=True, top_logprobs=21),
        422,
        "top_logprobs",
        ("top_logprobs", LE + " 20"),
    ),
    "top_logprobs without logprobs": (
        chat_body(top_logprobs=2),
        422,
        "top_logprobs",
        ("top_logprobs", "logprobs must be true"),
    ),
    "frequency_penalty 3": (chat_body(frequency_penalty=3), 422, "frequency_penalty", ("frequency_penalty",)),
    "stop of wrong type": (chat_body(stop=5), 422, "stop", ("stop", "valid string")),
    "nvext.top_k 0": (chat_body(nvext={"top_k": 0}), 422, "nvext.top_k", ("nvext.top_k", "-1 (off) or >= 1")),
    "nvext.repetition_penalty 0": (
        chat_body(nvext={"repetition_penalty": 0}),
        422,
        "nvext.repetition_penalty",
        ("nvext.repetition_penalty", "greater than 0"),
    ),
    "nvext.repetition_penalty 2.5": (
        chat_body(nvext={"repetition_penalty": 2.5}),
        422,
        "nvext.repetition_penalty",
        ("nvext.repetition_penalty", LE + " 2"),
    ),
    "unknown model": (chat_body(model="gpt-4o"), 404, "model", ("gpt-4o", "does not exist")),
    "tools": (
        chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        400,
        "tools",
        ("tool calling is not offered",),
    ),
    "tool_choice required": (chat_body(tool_choice="required"), 400, "tool_choice", ("tool calling",)),
    "logit_bias key not an id": (
        chat_body(logit_bias={"hello": 2}),
        400,
        "logit_bias",
        ("logit_bias", "'hello' is not a token id"),
    ),
    "logit_bias over 100": (
        chat_body(logit_bias={"5": 101}),
        400,
        "logit_bias",
        ("logit_bias", "token 5", "outside [-100, 100]"),
    ),
    # the fake model's vocabulary: 256 byte tokens + eos
    "logit_bias id past the vocabulary": (
        chat_body(logit_bias={"257": 1}),
        400,
        "logit_bias",
        ("logit_bias", "token id 257 is outside the vocabulary", "0 to 256"),
    ),
    "nvext.min_p over 1": (chat_body(nvext={"min_p": 1.5}), 422, "nvext.min_p", ("min_p", LE)),
    "two structured-output constraints": (
        chat_body(response_format={"type": "json_object"}, nvext={"guided_regex": "a+"}),
        400,
        "nvext.guided_regex",
        ("response_format json_object and nvext.guided_regex", "cannot be combined"),
    ),
    "guided_json not JSON": (
        chat_body(nvext={"guided_json": "{not json"}),
        400,
        "nvext.guided_json",
        ("nvext.guided_json is not valid JSON",),
    ),
    # the spec really compiles against the model's tokenizer, before the engine sees the request
    "guided_regex does not compile": (
        chat_body(nvext={"guided_regex": "a(b"}),
        400,
        "nvext.guided_regex",
        ("nvext.guided_regex (regular expression) cannot be used",),
    ),
    "json_schema with a bad type": (
        chat_body(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        ),
        400,
        "response_format.json_schema.schema",
        ("response_format.json_schema.schema (JSON schema) cannot be used",),
    ),
    "guided_grammar does not parse": (
        chat_body(nvext={"guided_grammar": "root ::= ("}),
        400,
        "nvext.guided_grammar",
        ("nvext.guided_grammar (grammar) cannot be used",),
    ),
    "context exceeded": (
        chat_body(messages=[{"role": "user", "content": "word " * 4000}], max_tokens=200),
        400,
        "messages",
        ("maximum context length is 4096", "4000 in the messages", "200 in max_tokens"),
    ),
    "prompt fills the context": (
        chat_body(messages=[{"role": "user", "content": "word " * 4096}]),
        400,
        "messages",
        ("maximum context length is 4096", "4096 tokens"),
    ),
    "image fails to load": (
        messages({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "bad"}}]}),
        400,
        "messages",
        ("could not be decoded",),
    ),
}


@pytest.mark.parametrize("case", list(RULES))
async def test_rule(client: httpx.AsyncClient, engine: FakeEngine, case: str) -> None:
    body, status, param, needles = RULES[case]
    response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, status, *needles, param=param)
    assert engine.requests == []


@pytest.mark.parametrize("case", ["temperature 1.1", "two users in a row", "unknown model", "tools"])
async def test_rule_also_when_streaming(client: httpx.AsyncClient, case: str) -> None:
    body, status, param, needles = RULES[case]
    response = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert_error(response, status, *needles, param=param)


@pytest.mark.parametrize(
    "body",
    [
        messages(USER),
        messages(SYSTEM, USER),
        messages(SYSTEM, USER, ASSISTANT, USER),
        messages(USER, {"role": "assistant", "content": ""}),
        messages(USER, {"role": "assistant", "content": None}),
        messages(*([USER, ASSISTANT] * 511), USER, ASSISTANT),
        chat_body(temperature=0, top_p=1, max_tokens=2048, seed=-(2**63), n=16, top_logprobs=20, logprobs=1),
        chat_body(temperature=1, max_completion_tokens=1, seed=2**63 - 1, stop=["x", "y"]),
        chat_body(model=None),
        {"messages": [USER]},
        chat_body(unknown_field=1, tools=[], tool_choice="none", response_format={"type": "text"}),
        chat_body(response_format={"type": "json_object"}, logit_bias={"5": -100, "256": 100}),
        chat_body(nvext={"guided_regex": r"\d{4}-\d{2}", "min_p": 0.1}),
        chat_body(nvext={"guided_choice": ["yes", "no"]}),
        chat_body(nvext={"guided_grammar": 'root ::= "a" [0-9]+'}),
    ],
    ids=lambda body: str(len(body.get("messages", []))),
)
async def test_valid_requests_are_served(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


async def test_malformed_json_is_422_in_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "JSON")


async def test_several_errors_are_all_named(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(temperature=2, top_p=0))
    assert_error(response, 422, "temperature", "top_p", param="temperature")


async def test_structured_output_and_logit_bias_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = chat_body(
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
        logit_bias={"7": 2.5, "3": -100},
        nvext={"min_p": 0.25},
    )
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    params = engine.requests[0].sampling_params
    assert params.guided is not None
    assert (params.guided.kind, params.guided.value) == ("json", '{"type":"object"}')
    assert params.logit_bias == ((3, -100.0), (7, 2.5))
    assert params.min_p == 0.25
