"""Structured output through a real server and the official SDK: response_format json_schema/json_object
and nvext.guided_json/regex/choice/grammar, streamed and not, mixed in one concurrent batch with free
requests; bad specs are 400s; max_tokens first says length; logit_bias and nvext.min_p are honoured."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import RunningServer
from tests.e2e.helpers import MODEL, data_url, png_bytes, user_text, user_with_images
from tests.fixtures.guided import CHOICES, GRAMMAR, GRAMMAR_TEXT, ISO_DATE, SCHEMA

MAX_TOKENS = 600
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

# (request fields, check of the answer's text)
CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "response_format json_schema": (
        {"response_format": SCHEMA_FORMAT},
        lambda text: jsonschema.validate(json.loads(text), SCHEMA),
    ),
    "nvext.guided_json as object": (
        {"extra_body": {"nvext": {"guided_json": SCHEMA}}},
        lambda text: jsonschema.validate(json.loads(text), SCHEMA),
    ),
    "nvext.guided_json as string": (
        {"extra_body": {"nvext": {"guided_json": json.dumps(SCHEMA)}}},
        lambda text: jsonschema.validate(json.loads(text), SCHEMA),
    ),
    "nvext.guided_regex": (
        {"extra_body": {"nvext": {"guided_regex": ISO_DATE}}},
        lambda text: re.fullmatch(ISO_DATE, text) or pytest.fail(text),
    ),
    "nvext.guided_choice": (
        {"extra_body": {"nvext": {"guided_choice": list(CHOICES)}}},
        lambda text: text in CHOICES or pytest.fail(text),
    ),
    "nvext.guided_grammar": (
        {"extra_body": {"nvext": {"guided_grammar": GRAMMAR}}},
        lambda text: GRAMMAR_TEXT.fullmatch(text) or pytest.fail(text),
    ),
}


def _create(client: openai.OpenAI, fields: dict[str, Any], **extra: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=user_text(), max_tokens=MAX_TOKENS, temperature=0, **fields, **extra
    )


@pytest.mark.parametrize("case", list(CASES))
def test_guided_output_follows_the_spec_streamed_and_not(sdk: openai.OpenAI, case: str) -> None:
    fields, check = CASES[case]
    response = _create(sdk, fields)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    check(choice.message.content)

    chunks = list(_create(sdk, fields, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_object_with_an_image(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model=MODEL,
        messages=user_with_images(data_url(png_bytes(64, 64))),
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = response.choices[0]
    # any JSON object is allowed, so a random model may still be writing one at max_tokens
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"
        assert choice.message.content.lstrip().startswith("{")


async def test_guided_and_free_requests_in_one_concurrent_batch(
    server: RunningServer, sdk: openai.OpenAI
) -> None:
    free = {"max_tokens": 16, "extra_body": {"nvext": {"ignore_eos": True}}}
    alone = sdk.chat.completions.create(model=MODEL, messages=user_text(), temperature=0, **free)
    client = openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )

    async def one(fields: dict[str, Any], stream: bool) -> tuple[str, str]:
        kwargs = {
            "model": MODEL,
            "messages": user_text(),
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            **fields,
        }
        if not stream:
            choice = (await client.chat.completions.create(**kwargs)).choices[0]
            return choice.message.content, choice.finish_reason
        parts, finish = [], ""
        async for chunk in await client.chat.completions.create(**kwargs, stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    jobs = [one(fields, stream=i % 2 == 1) for i, (fields, _) in enumerate(CASES.values())]
    jobs += [one(free, stream=False), one(free, stream=True)]
    results = await asyncio.gather(*jobs)
    await client.close()
    for (text, finish), (_, check) in zip(results, CASES.values(), strict=False):
        assert finish == "stop"
        check(text)
    assert [text for text, _ in results[-2:]] == [alone.choices[0].message.content] * 2


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"extra_body": {"nvext": {"guided_regex": "[0-9"}}}, "nvext.guided_regex", "regular expression"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
            "JSON schema",
        ),
        ({"extra_body": {"nvext": {"guided_grammar": "root ::= ("}}}, "nvext.guided_grammar", "grammar"),
        ({"extra_body": {"nvext": {"guided_choice": []}}}, "nvext.guided_choice", "at least one choice"),
    ],
)
def test_a_bad_spec_is_a_400_naming_it(
    sdk: openai.OpenAI, fields: dict[str, Any], param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        _create(sdk, fields)
    body = excinfo.value.body
    assert isinstance(body, dict) and body.get("param") == param, body
    assert needle in body["message"]
    assert _create(sdk, CASES["nvext.guided_choice"][0]).choices[0].finish_reason == "stop"  # still up


def test_max_tokens_before_the_spec_completes_is_length(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model=MODEL, messages=user_text(), max_tokens=3, temperature=0, response_format=SCHEMA_FORMAT
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 3
    assert choice.message.content.startswith("{")


def test_logit_bias_and_min_p(server: RunningServer, sdk: openai.OpenAI) -> None:
    base = sdk.chat.completions.create(model=MODEL, messages=user_text(), max_tokens=1, temperature=0)
    text = base.choices[0].message.content
    tokenized = httpx.post(
        server.base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30
    ).json()
    assert tokenized["count"] == 1, tokenized
    token_id = tokenized["tokens"][0]
    banned = sdk.chat.completions.create(
        model=MODEL, messages=user_text(), max_tokens=1, temperature=0, logit_bias={str(token_id): -100}
    )
    assert banned.choices[0].message.content != base.choices[0].message.content
    # min_p 1.0 keeps only the most likely token: sampling at temperature 1 gives the greedy text
    greedy = sdk.chat.completions.create(model=MODEL, messages=user_text(), max_tokens=6, temperature=0)
    for seed in (1, 2):
        sampled = sdk.chat.completions.create(
            model=MODEL,
            messages=user_text(),
            max_tokens=6,
            temperature=1,
            seed=seed,
            extra_body={"nvext": {"min_p": 1.0}},
        )
        assert sampled.choices[0].message.content == greedy.choices[0].message.content
