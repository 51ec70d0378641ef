"""Test helpers for inputs/: a tiny Llama-3-style tokenizer folder and image encoders."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
]
IMAGE_TOKENS = ["<img>", "</img>", "<image>"]
# A cut-down Llama 3.1 template: BOS, header per message, content trimmed, <|eot_id|> after each.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_CORPUS = [
    "hello world, what is in this image? Describe the picture in detail.",
    "Compare these two images and tell me which one is brighter.\n\nThe answer is: the first one.",
    "You are a helpful assistant. The cat sat on the mat.",
]

NEMOTRON_CONFIG = {"force_image_size": 512, "patch_size": 16, "downsample_ratio": 0.5, "use_thumbnail": True}
SMALL_TILE_CONFIG = {"force_image_size": 32, "patch_size": 8, "downsample_ratio": 0.5, "use_thumbnail": True}


def write_tiny_tokenizer(out_dir: Path, *, template_in_config: bool = True) -> Path:
    """A byte-level BPE tokenizer (a few hundred ids) with Llama 3 special tokens and the image tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS * 5, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if template_in_config:
        config["chat_template"] = TINY_CHAT_TEMPLATE
    else:
        (out_dir / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir


def encode_image(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def png_data_url(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    return data_url(encode_image(Image.new("RGB", (width, height), color)))
