"""A chat request's structured-output constraint: response_format json_object / json_schema, or one of
nvext.guided_json, guided_regex, guided_choice, guided_grammar, turned into a GuidedDecodingSpec.

Checks the form only (malformed or several constraints: 400); whether a schema, regex or grammar
compiles against the model's tokenizer is runner/structured_output.validate_spec's job.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.types import GuidedDecodingSpec

if TYPE_CHECKING:
    from vlmserve.protocol.openai import NVExt, ResponseFormat


GUIDED_NVEXT_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def guided_spec(response_format: ResponseFormat | None, nvext: NVExt | None) -> GuidedDecodingSpec | None:
    """The request's structured-output constraint, or None. InvalidRequestError (400) when it is
    malformed or when more than one is given: constraints do not combine."""
    # (param, label) of each constraint given
    given: list[tuple[str, str]] = []
    if response_format is not None and response_format.type != "text":
        given.append(("response_format", f"response_format {response_format.type}"))
    for name in GUIDED_NVEXT_FIELDS:
        if getattr(nvext, name, None) is not None:
            given.append((f"nvext.{name}", f"nvext.{name}"))
    if len(given) > 1:
        raise InvalidRequestError(
            f"{' and '.join(label for _, label in given)} cannot be combined: give at most one "
            "structured-output constraint (response_format json_object or json_schema, or one of "
            "nvext.guided_json, guided_regex, guided_choice, guided_grammar)",
            param=given[1][0],
        )
    if not given:
        return None
    param = given[0][0]
    if response_format is not None and param == "response_format":
        return _response_format_spec(response_format)
    return _nvext_spec(param, getattr(nvext, param.removeprefix("nvext.")))


def _nvext_spec(param: str, value: Any) -> GuidedDecodingSpec:
    """The spec of one nvext.guided_* field (`param` is its name, `value` is not None)."""
    if param == "nvext.guided_json":
        return GuidedDecodingSpec("json", _schema_text(value, param), param)
    if param == "nvext.guided_regex":
        return GuidedDecodingSpec("regex", value, param)
    if param == "nvext.guided_choice":
        if not value:
            raise InvalidRequestError(f"{param} must list at least one choice", param=param)
        return GuidedDecodingSpec("choice", tuple(value), param)
    if not value.strip():
        raise InvalidRequestError(f"{param} is empty: give a grammar in Lark or GBNF syntax", param=param)
    return GuidedDecodingSpec("grammar", value, param)


def _response_format_spec(response_format: ResponseFormat) -> GuidedDecodingSpec:
    """json_object: any JSON object. json_schema: OpenAI's {name, description?, schema, strict?}; `strict`
    is accepted and the schema is always enforced."""
    if response_format.type == "json_object":
        return GuidedDecodingSpec("json_object", "", "response_format")
    json_schema = response_format.json_schema
    if json_schema is None:
        raise InvalidRequestError(
            "response_format.json_schema is required when type is 'json_schema': "
            '{"name": ..., "schema": {...}}',
            param="response_format.json_schema",
        )
    name = json_schema.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            "response_format.json_schema.name is required: a non-empty string naming the schema",
            param="response_format.json_schema.name",
        )
    param = "response_format.json_schema.schema"
    if "schema" not in json_schema:
        raise InvalidRequestError(f"{param} is required: the JSON schema the answer must follow", param=param)
    return GuidedDecodingSpec("json", _schema_text(json_schema["schema"], param), param)


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema (an object, or JSON text of one) as compact JSON text, key order kept."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from e
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            f"{param} must be a JSON schema object, not {type(schema).__name__}", param=param
        )
    return json.dumps(schema, separators=(",", ":"))
