from __future__ import annotations

import pytest

from vlmserve.inputs.content import parse_content, parse_messages
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart

URL = "data:image/png;base64,iVBORw0KGgo="


def test_list_content_keeps_part_order() -> None:
    message = ChatMessage("user", [TextPart("first"), ImagePart(URL), TextPart("second"), ImagePart("http://x/y.png")])
    assert parse_content(message) == ["first", ImagePart(URL), "second", ImagePart("http://x/y.png")]


def test_adjacent_text_parts_join_with_newline() -> None:
    message = ChatMessage("user", [TextPart("a"), TextPart("b"), ImagePart(URL)])
    assert parse_content(message) == ["a\nb", ImagePart(URL)]


def test_tags_are_not_parsed_inside_text_parts() -> None:
    text = f'look <img src="{URL}" /> here'
    assert parse_content(ChatMessage("user", [TextPart(text)])) == [text]


@pytest.mark.parametrize(
    "tag",
    [
        f'<img src="{URL}" />',
        f"<img src='{URL}'>",
        f'<img src="{URL}">',
        f'<IMG  alt="a cat"  src = "{URL}"  width="10"/>',
        f'<img\n  src="{URL}"\n/>',
    ],
)
def test_img_tag_forms(tag: str) -> None:
    message = ChatMessage("user", f"What is this? {tag} Tell me.")
    assert parse_content(message) == ["What is this? ", ImagePart(URL), " Tell me."]


def test_several_tags_and_surrounding_text_in_place() -> None:
    content = f'<img src="{URL}" />Compare<img src="http://h/a.png" />\nwith text'
    assert parse_content(ChatMessage("user", content)) == [
        ImagePart(URL), "Compare", ImagePart("http://h/a.png"), "\nwith text"
    ]


def test_data_src_attribute_is_not_src() -> None:
    content = '<img data-src="http://h/a.png" alt="x"> text'
    assert parse_content(ChatMessage("user", content)) == [content]


def test_system_and_assistant_strings_are_plain_text() -> None:
    content = f'see <img src="{URL}" />'
    assert parse_content(ChatMessage("system", content)) == [content]
    assert parse_content(ChatMessage("assistant", content)) == [content]


def test_empty_and_null_content() -> None:
    assert parse_content(ChatMessage("assistant", None)) == []
    assert parse_content(ChatMessage("assistant", "")) == []
    assert parse_content(ChatMessage("user", "plain")) == ["plain"]


def test_parse_messages_lists_images_per_message() -> None:
    parsed = parse_messages([ChatMessage("system", "s"), ChatMessage("user", f'<img src="{URL}"> hi')])
    assert [m.role for m in parsed] == ["system", "user"]
    assert parsed[1].images == [ImagePart(URL)]
