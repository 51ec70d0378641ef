"""Prompt ids with images spliced in: the part of every family's processor that does not depend on how
one image's tokens are laid out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.types import ImageInput

T = TypeVar("T")


def splice_images(
    tokenizer: Any,
    prompt_text: str,
    sentinel: str,
    images: Sequence[T],
    expand: Callable[[T, int], tuple[list[int], ImageInput]],
) -> tuple[list[int], list[ImageInput]]:
    """Token ids of `prompt_text`, whose i-th `sentinel` stands for images[i], and the image inputs.

    Each segment between sentinels is tokenized on its own (no special tokens added: the template
    already wrote BOS); `expand(image, position)` gives the ids of one image placed at `position` and
    its ImageInput. Since image expansions start and end with special tokens, this equals tokenizing
    the expanded text in one piece.
    """
    segments = prompt_text.split(sentinel)
    if len(segments) != len(images) + 1:
        raise InvalidRequestError(
            f"the chat template kept {len(segments) - 1} of {len(images)} images", param="messages"
        )
    prompt_token_ids: list[int] = []
    image_inputs: list[ImageInput] = []
    for index, segment in enumerate(segments):
        if segment:
            prompt_token_ids.extend(tokenizer.encode(segment, add_special_tokens=False))
        if index < len(images):
            ids, image_input = expand(images[index], len(prompt_token_ids))
            prompt_token_ids.extend(ids)
            image_inputs.append(image_input)
    return prompt_token_ids, image_inputs


def check_image_token_count(
    prompt_token_ids: list[int], image_inputs: list[ImageInput], image_token_id: int, image_token: str
) -> None:
    """Text that spells the image token tokenizes to it too (the engine would put features there):
    refuse any prompt with more image tokens than its images take."""
    if prompt_token_ids.count(image_token_id) != sum(image.num_embeds for image in image_inputs):
        raise InvalidRequestError(
            f"message text must not contain the image token {image_token!r}; "
            "send images as image_url parts or <img src> tags",
            param="messages",
        )
