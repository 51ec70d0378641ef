from __future__ import annotations

from pathlib import Path

import pytest

from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.chat_template import message_text, render_chat
from vlmserve.inputs.content import ParsedMessage
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.protocol.types import ImagePart

S = "<|sentinel|>"
IMG = ImagePart("data:image/png;base64,AAAA")


def test_message_text_puts_sentinel_and_newline_where_images_were() -> None:
    assert message_text([IMG, "What is this?"], S) == f"{S}\nWhat is this?"
    assert message_text(["Compare ", IMG, " and ", IMG], S) == f"Compare {S}\n and {S}\n"


def test_render_matches_hf_with_image_placeholders(tiny_tokenizer: object) -> None:
    messages = [
        ParsedMessage("system", ["Be brief."]),
        ParsedMessage("user", [IMG, "What is this?"]),
        ParsedMessage("assistant", ["A cat."]),
        ParsedMessage("user", ["And these?", IMG, IMG]),
    ]
    text = render_chat(tiny_tokenizer, messages, sentinel=S, completion_mode=False)
    hf_messages = [{"role": m.role, "content": message_text(m.items, "<image>")} for m in messages]
    expected = tiny_tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    assert text == expected.replace("<image>", S)
    assert text.count(S) == 3
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_completion_mode_continues_the_final_message(tiny_tokenizer: object) -> None:
    messages = [ParsedMessage("user", ["hello"]), ParsedMessage("assistant", ["The answer is"])]
    text = render_chat(tiny_tokenizer, messages, sentinel=S, completion_mode=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")


@pytest.mark.parametrize("items", [[], [""], ["  "]])
def test_completion_mode_with_empty_final_message(tiny_tokenizer: object, items: list[str]) -> None:
    messages = [ParsedMessage("user", ["hello"]), ParsedMessage("assistant", items)]
    text = render_chat(tiny_tokenizer, messages, sentinel=S, completion_mode=True)
    normal = render_chat(tiny_tokenizer, messages[:1], sentinel=S, completion_mode=False)
    assert text == normal


def test_template_error_is_invalid_request(tiny_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        render_chat(tokenizer, [ParsedMessage("user", ["hi"])], sentinel=S, completion_mode=False)
    assert info.value.param == "messages"
