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


PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_templates_that_iterate_typed_parts_get_parts(tiny_tokenizer: object) -> None:
    """SmolVLM-style templates read content as typed parts and write their own image placeholder;
    a plain string would make them drop the text."""
    original = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = PARTS_TEMPLATE
    try:
        messages = [ParsedMessage("user", ["Compare ", IMG, " and ", IMG])]
        text = render_chat(tiny_tokenizer, messages, sentinel=S, completion_mode=False)
        # (HF renders with trim_blocks: the newline after a block tag goes)
        assert text == f"user:Compare {S} and {S}assistant:"
        with pytest.raises(InvalidRequestError, match="image token"):
            render_chat(
                tiny_tokenizer, [ParsedMessage("user", ["a <image> b"])], sentinel=S, completion_mode=False
            )
    finally:
        tiny_tokenizer.chat_template = original


def test_chat_template_json_is_read(tmp_path: Path, tiny_tokenizer: object) -> None:
    import json

    tiny_tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    for name in ("chat_template.jinja",):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": PARTS_TEMPLATE}))
    assert load_tokenizer(tmp_path).chat_template == PARTS_TEMPLATE
