"""Render parsed chat messages to prompt text with the tokenizer's chat template.

Each image becomes `<sentinel>\\n` where it stood in its user message; the sentinel is a string no
message holds, so the processor can later split the text there and splice in the image's token ids.
Templates that expect OpenAI-style content lists (they test each part's `type`, as SmolVLM's does)
get `{"type": "text"}` and `{"type": "image"}` parts instead; the template writes its own image
placeholder for each image part, which is then replaced by the sentinel, in order.
This module never tokenizes and never touches pixels.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError

from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.content import ContentItem, ParsedMessage

# A template that looks at a content part's type wants the content as a list of parts.
_PARTS_TEMPLATE = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b""")


def wants_content_parts(template: str | None) -> bool:
    return bool(template and _PARTS_TEMPLATE.search(template))


def message_parts(items: list[ContentItem]) -> list[dict[str, str]]:
    """The content as OpenAI-style parts for templates that iterate over them."""
    return [{"type": "text", "text": item} if isinstance(item, str) else {"type": "image"} for item in items]


def message_text(items: list[ContentItem], sentinel: str) -> str:
    """The content as template input: text as is, each image as sentinel + newline."""
    return "".join(item if isinstance(item, str) else sentinel + "\n" for item in items)


def render_chat(
    tokenizer: Any,
    messages: list[ParsedMessage],
    *,
    sentinel: str,
    completion_mode: bool,
    image_placeholder: str = "<image>",
) -> str:
    """The prompt text for `messages`.

    Without completion mode the template adds the assistant header (add_generation_prompt). In
    completion mode the final assistant message is continued (continue_final_message); when its
    content is empty it is dropped and the generation prompt used instead, so the prompt ends with
    the assistant header exactly as in a normal request (HF's continue_final_message would also
    strip the header's trailing whitespace). Template errors raise InvalidRequestError.
    """
    as_parts = wants_content_parts(tokenizer.chat_template)
    conversation: list[dict[str, Any]] = [
        {"role": m.role, "content": message_parts(m.items) if as_parts else message_text(m.items, sentinel)}
        for m in messages
    ]
    continue_final = completion_mode
    last = messages[-1] if messages else None
    if completion_mode and last is not None and last.role == "assistant" and not _text_of(last.items).strip():
        conversation.pop()
        continue_final = False
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        message = f"the chat template cannot render these messages: {e}"
        raise InvalidRequestError(message, param="messages") from e
    if as_parts:
        text = _placeholders_to_sentinels(text, messages, image_placeholder, sentinel)
    return text


def _text_of(items: list[ContentItem]) -> str:
    return "".join(item for item in items if isinstance(item, str))


def _placeholders_to_sentinels(
    text: str, messages: list[ParsedMessage], image_placeholder: str, sentinel: str
) -> str:
    num_images = sum(not isinstance(item, str) for m in messages for item in m.items)
    if any(image_placeholder in _text_of(m.items) for m in messages):
        raise InvalidRequestError(
            f"message text must not contain the image token {image_placeholder!r}; "
            "send images as image_url parts or <img src> tags",
            param="messages",
        )
    if text.count(image_placeholder) != num_images:
        raise InvalidRequestError(
            f"the chat template wrote {text.count(image_placeholder)} image placeholders "
            f"for {num_images} images",
            param="messages",
        )
    return text.replace(image_placeholder, sentinel)
