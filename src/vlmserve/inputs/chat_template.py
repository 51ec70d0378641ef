"""Render parsed chat messages to prompt text with the tokenizer's chat template.

Each image becomes `<sentinel>\\n` where it stood in its user message; the sentinel is a string no
message holds, so the processor can later split the text there and splice in the image's token ids.
This module never tokenizes and never touches pixels.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.content import ContentItem, ParsedMessage


def message_text(items: list[ContentItem], sentinel: str) -> str:
    """The content as template input: text as is, each image as sentinel + newline."""
    return "".join(item if isinstance(item, str) else sentinel + "\n" for item in items)


def render_chat(
    tokenizer: Any, messages: list[ParsedMessage], *, sentinel: str, completion_mode: bool
) -> str:
    """The prompt text for `messages`.

    Without completion mode the template adds the assistant header (add_generation_prompt). In
    completion mode the final assistant message is continued (continue_final_message); when its
    content is empty it is dropped and the generation prompt used instead, so the prompt ends with
    the assistant header exactly as in a normal request (HF's continue_final_message would also
    strip the header's trailing whitespace). Template errors raise InvalidRequestError.
    """
    conversation = [{"role": m.role, "content": message_text(m.items, sentinel)} for m in messages]
    continue_final = completion_mode
    last = conversation[-1] if conversation else None
    if completion_mode and last is not None and last["role"] == "assistant" and not last["content"].strip():
        conversation.pop()
        continue_final = False
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        message = f"the chat template cannot render these messages: {e}"
        raise InvalidRequestError(message, param="messages") from e
