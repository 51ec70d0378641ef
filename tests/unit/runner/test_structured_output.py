"""Structured output guides with the real SmolLM2 tokenizer: a random-logits "model" sampling through the
guide's mask always ends in text that parses and validates; bad specs are 400s; masks and caching."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.tokenizer import eos_token_ids, load_tokenizer
from vlmserve.protocol.types import GuidedDecodingSpec
from vlmserve.runner.structured_output import (
    GuideState,
    TokenizerInfo,
    allocate_bitmask,
    apply_bitmask_,
    build_tokenizer_info,
    compile_guide,
    unpack_bitmask,
    validate_spec,
)

# the model's logits are wider than the tokenizer (49155 ids): padding rows of the embedding
LOGITS_WIDTH = 49280
SEEDS = range(4)
MAX_STEPS = 400

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "orders": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "kind": {"enum": ["retail", "wholesale"]},
                    "paid": {"type": "boolean"},
                },
                "required": ["id", "kind", "paid"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "status", "address", "orders"],
    "additionalProperties": False,
}
ISO_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ("yes", "no", "not sure", 'say "maybe"', "a|b (c)")
# arithmetic over small integers, no whitespace: whatever it yields is a Python expression as well
ARITHMETIC_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
ARITHMETIC_GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9] [0-9]? [0-9]? | "(" expr ")"
"""


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    return load_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def info(tokenizer: Any, smollm2_tokenizer_dir: Path) -> TokenizerInfo:
    return build_tokenizer_info(tokenizer, eos_token_ids(smollm2_tokenizer_dir, tokenizer), LOGITS_WIDTH)


@pytest.fixture(scope="module")
def closing_bias(tokenizer: Any, info: TokenizerInfo) -> torch.Tensor:
    """+4 on the logits of eos and of tokens that close something (a string, an object, an array, a
    parenthesis), so that the random "model" ends its strings and nestings after a few tokens rather
    than a few thousand; it stays random otherwise."""
    bias = torch.zeros(LOGITS_WIDTH)
    for token_id in range(len(tokenizer)):
        if any(c in tokenizer.decode([token_id]) for c in '"}])'):
            bias[token_id] = 4.0
    bias[list(info.eos_token_ids)] = 4.0
    return bias


def generate(state: GuideState, info: TokenizerInfo, tokenizer: Any, bias: torch.Tensor, seed: int) -> str:
    """Samples from random logits masked by the guide until it terminates; the text without eos.
    Random logits are drawn for the allowed tokens only: the same distribution, fewer draws."""
    generator = torch.Generator().manual_seed(seed)
    token_ids: list[int] = []
    for _ in range(MAX_STEPS):
        if state.is_terminated():
            return tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)
        allowed_ids = state.allowed_mask(LOGITS_WIDTH).nonzero().flatten()
        logits = torch.randn(len(allowed_ids), generator=generator) * 3 + bias[allowed_ids]
        token_id = int(allowed_ids[torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)])
        assert state.accept(token_id), state.error
        if token_id not in info.eos_token_ids:
            token_ids.append(token_id)
    text = tokenizer.decode(token_ids)
    pytest.fail(f"seed {seed}: the guide did not terminate in {MAX_STEPS} tokens: {text!r}")


def spec(kind: str, value: Any) -> GuidedDecodingSpec:
    return GuidedDecodingSpec(kind, value, param=f"nvext.guided_{kind}")  # type: ignore[arg-type]


# --- random-logits generation ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_nested_schema_output_validates(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor, seed: int
) -> None:
    guide = compile_guide(spec("json", json.dumps(NESTED_SCHEMA)), info)
    text = generate(guide.new_state(), info, tokenizer, closing_bias, seed)
    jsonschema.validate(json.loads(text), NESTED_SCHEMA)
    # properties come in schema order
    assert list(json.loads(text))[:3] == ["name", "age", "status"]


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_output_is_an_object(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor, seed: int
) -> None:
    text = generate(
        compile_guide(GuidedDecodingSpec("json_object", ""), info).new_state(),
        info,
        tokenizer,
        closing_bias,
        seed,
    )
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_output_matches(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor, seed: int
) -> None:
    text = generate(
        compile_guide(spec("regex", ISO_DATE), info).new_state(), info, tokenizer, closing_bias, seed
    )
    assert re.fullmatch(ISO_DATE, text), text


@pytest.mark.parametrize("seed", SEEDS)
def test_choice_output_is_a_choice(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor, seed: int
) -> None:
    text = generate(
        compile_guide(spec("choice", CHOICES), info).new_state(), info, tokenizer, closing_bias, seed
    )
    assert text in CHOICES


@pytest.mark.parametrize("grammar", [ARITHMETIC_LARK, ARITHMETIC_GBNF], ids=["lark", "gbnf"])
@pytest.mark.parametrize("seed", SEEDS)
def test_grammar_output_parses(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor, grammar: str, seed: int
) -> None:
    text = generate(
        compile_guide(spec("grammar", grammar), info).new_state(), info, tokenizer, closing_bias, seed
    )
    assert re.fullmatch(r"[0-9+\-*/()]+", text), text
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    assert all(isinstance(node, allowed) for node in ast.walk(tree)), text
    assert all(len(number) <= 3 for number in re.findall(r"[0-9]+", text)), text


# --- masks ---------------------------------------------------------------------------------------------


def test_eos_allowed_exactly_when_the_grammar_can_end(info: TokenizerInfo, tokenizer: Any) -> None:
    state = compile_guide(spec("regex", "[0-9]+"), info).new_state()
    eos = list(info.eos_token_ids)
    assert not state.allowed_mask(LOGITS_WIDTH)[eos].any()
    assert state.accept(tokenizer.convert_tokens_to_ids("7"))
    mask = state.allowed_mask(LOGITS_WIDTH)
    assert mask[eos].all() and mask[tokenizer.convert_tokens_to_ids("8")]
    assert not state.is_terminated()
    assert state.accept(eos[0]) and state.is_terminated()


def test_complete_json_terminates_without_eos(info: TokenizerInfo, tokenizer: Any) -> None:
    state = compile_guide(
        spec("json", '{"type":"object","properties":{"a":{"type":"integer"}}}'), info
    ).new_state()
    for token_id in tokenizer.encode('{"a": 12', add_special_tokens=False):
        assert state.accept(token_id), state.error
        assert not state.allowed_mask(LOGITS_WIDTH)[list(info.eos_token_ids)].any()
    assert state.accept(tokenizer.convert_tokens_to_ids("}"))
    assert state.is_terminated()
    # nothing may follow but eos
    assert state.allowed_mask(LOGITS_WIDTH).nonzero().flatten().tolist() == list(info.eos_token_ids)


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"a":1,"b":[1,2]}', True),
        ('{"a": 1, "b": [1, 2]}', True),
        ('{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}', True),
        ("{" + " " * 21 + '"a": 1}', False),  # whitespace is capped: a model cannot loop on it
    ],
)
def test_json_whitespace(info: TokenizerInfo, tokenizer: Any, text: str, accepted: bool) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array"}}}
    state = compile_guide(GuidedDecodingSpec("json", json.dumps(schema)), info).new_state()
    ok = all(state.accept(token_id) for token_id in tokenizer.encode(text, add_special_tokens=False))
    assert ok == accepted and state.is_terminated() == accepted


def test_mask_is_padded_or_cut_to_the_logits_width(info: TokenizerInfo, tokenizer: Any) -> None:
    state = compile_guide(GuidedDecodingSpec("json_object", ""), info).new_state()
    wide = state.allowed_mask(LOGITS_WIDTH + 100)
    assert wide.shape == (LOGITS_WIDTH + 100,) and not wide[len(tokenizer) :].any()
    assert wide[tokenizer.convert_tokens_to_ids("{")]
    assert torch.equal(state.allowed_mask(1000), wide[:1000])
    # special tokens (the image placeholders among them) are never allowed
    assert not wide[[tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "<image>", "<|im_start|>")]].any()


def test_bitmask_and_bool_masks_agree(info: TokenizerInfo) -> None:
    states = [compile_guide(spec("choice", CHOICES), info).new_state() for _ in range(2)]
    bitmask = allocate_bitmask(3, LOGITS_WIDTH)
    states[0].fill_mask(bitmask[0])
    states[1].fill_mask(bitmask[2])
    expected = states[0].allowed_mask(LOGITS_WIDTH)
    unpacked = unpack_bitmask(bitmask, LOGITS_WIDTH)
    assert torch.equal(unpacked[0], expected) and torch.equal(unpacked[2], expected)
    assert unpacked[1].all()  # a row of an unguided request stays all allowed
    as_bool = torch.zeros(LOGITS_WIDTH, dtype=torch.bool)
    states[0].fill_mask(as_bool)
    assert torch.equal(as_bool, expected)
    logits = torch.zeros(3, LOGITS_WIDTH)
    apply_bitmask_(logits, bitmask)
    assert torch.equal(logits[0] == 0, expected) and (logits[1] == 0).all()


def test_states_of_one_guide_are_independent(info: TokenizerInfo, tokenizer: Any) -> None:
    guide = compile_guide(spec("choice", ("yes", "no")), info)
    first, second = guide.new_state(), guide.new_state()
    assert first.accept(tokenizer.convert_tokens_to_ids("yes")) and first.is_terminated()
    assert not second.is_terminated()
    assert second.allowed_mask(LOGITS_WIDTH)[tokenizer.convert_tokens_to_ids("no")]


def test_a_rejected_token_puts_the_state_in_error(info: TokenizerInfo, tokenizer: Any) -> None:
    state = compile_guide(spec("choice", ("yes", "no")), info).new_state()
    assert not state.accept(tokenizer.convert_tokens_to_ids("{"))
    assert state.error and not state.is_terminated()
    assert state.allowed_mask(LOGITS_WIDTH).nonzero().flatten().tolist() == list(info.eos_token_ids)
    other = compile_guide(spec("choice", ("yes", "no")), info).new_state()
    assert not other.accept(LOGITS_WIDTH + 5) and "outside" in (other.error or "")


# --- compile, cache, validation ----------------------------------------------------------------------


def test_compiled_guides_are_cached_lru(tokenizer: Any) -> None:
    info = build_tokenizer_info(tokenizer, [2], max_cached_guides=2)
    a, b, c = (spec("regex", pattern) for pattern in ("a+", "b+", "c+"))
    guide_a = compile_guide(a, info)
    assert compile_guide(spec("regex", "a+"), info) is guide_a  # equal specs share it
    compile_guide(b, info)
    compile_guide(a, info)  # a is now the most recent
    compile_guide(c, info)  # evicts b
    assert info.cached_guide(a) is guide_a
    assert info.cached_guide(b) is None


@pytest.mark.parametrize(
    ("kind", "value", "needle"),
    [
        ("json", '{"type": "foo"}', "Invalid type: foo"),
        ("json", '{"type": "object", "properties": 5}', "properties must be an object"),
        ("json", '{"type": "string", "format": "no-such-format"}', "no-such-format"),
        ("regex", "([a-z", "unclosed character class"),
        ("regex", r"\bword\b", "lookarounds not supported"),
        ("regex", "(a)\\1", "backreferences are not supported"),
        ("grammar", "start: missing_rule", "missing_rule"),
        ("grammar", 'root ::= ("a" ', "Expected ')'"),
        ("regex", "\ud800", "surrogates not allowed"),
    ],
)
def test_invalid_specs_are_400(info: TokenizerInfo, kind: str, value: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate_spec(spec(kind, value), info)
    assert caught.value.status == 400
    assert caught.value.param == f"nvext.guided_{kind}"
    assert caught.value.message.startswith(f"nvext.guided_{kind} (")
    assert needle in caught.value.message
    assert "<state>" not in caught.value.message and "\n" not in caught.value.message


def test_pydantic_style_schema_compiles(
    info: TokenizerInfo, tokenizer: Any, closing_bias: torch.Tensor
) -> None:
    schema = {
        "$defs": {
            "Address": {
                "properties": {"city": {"title": "City", "type": "string", "maxLength": 8}},
                "required": ["city"],
                "title": "Address",
                "type": "object",
            }
        },
        "properties": {
            "addresses": {"items": {"$ref": "#/$defs/Address"}, "maxItems": 2, "type": "array"},
            "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}], "default": None},
        },
        "required": ["addresses"],
        "title": "Person",
        "type": "object",
    }
    state = compile_guide(GuidedDecodingSpec("json", json.dumps(schema), "response_format"), info).new_state()
    jsonschema.validate(json.loads(generate(state, info, tokenizer, closing_bias, 0)), schema)
