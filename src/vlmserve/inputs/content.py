"""A chat message's content as an ordered list of text pieces and images.

List content keeps its part order (adjacent text parts are joined with a newline, as vLLM joins
them). String content of user messages may carry HTML `<img src="...">` tags (the hosted NIM API's
third image form): they become images where they stood, with the text around them kept in place.
Tags are never parsed inside a text part, nor in system or assistant messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart

ContentItem = str | ImagePart

# <img ... src="..." ...> or src='...', any other attributes and whitespace, with or without "/>".
# The lookbehind-free `\s` before src keeps attributes such as data-src from matching.
_IMG_TAG = re.compile(
    r"""<img\b[^>]*?\ssrc\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')[^>]*?/?\s*>""",
    re.IGNORECASE,
)


def parse_content(message: ChatMessage) -> list[ContentItem]:
    """The content of `message` as text pieces (str, never empty) and ImageParts, in order."""
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        if message.role == "user":
            return split_img_tags(content)
        return [content] if content else []
    return _from_parts(content)


def split_img_tags(text: str) -> list[ContentItem]:
    """Split string content on `<img src>` tags; each tag becomes an ImagePart with its src."""
    items: list[ContentItem] = []
    position = 0
    for match in _IMG_TAG.finditer(text):
        if match.start() > position:
            items.append(text[position:match.start()])
        src = match.group("dq") if match.group("dq") is not None else match.group("sq")
        items.append(ImagePart(url=src.strip()))
        position = match.end()
    if position < len(text):
        items.append(text[position:])
    return items


def _from_parts(parts: list[TextPart | ImagePart]) -> list[ContentItem]:
    items: list[ContentItem] = []
    for part in parts:
        if isinstance(part, ImagePart):
            items.append(part)
        elif items and isinstance(items[-1], str):
            items[-1] = items[-1] + "\n" + part.text
        elif part.text:
            items.append(part.text)
    return items


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """A chat message whose content is an ordered list of text pieces and images."""

    role: str
    items: list[ContentItem]

    @property
    def images(self) -> list[ImagePart]:
        return [item for item in self.items if isinstance(item, ImagePart)]


def parse_messages(messages: list[ChatMessage]) -> list[ParsedMessage]:
    """parse_content for each message. The HTTP layer has already kept images to user messages."""
    parsed = [ParsedMessage(message.role, parse_content(message)) for message in messages]
    assert all(m.role == "user" or not m.images for m in parsed), "images outside user messages"
    return parsed
