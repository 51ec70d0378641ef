"""Our Idefics3Processor vs transformers' Idefics3Processor with the PIL (slow) Idefics3 image processor.

SmolVLM-256M-Instruct's settings (512 px sub-images, longest edge 2048, LANCZOS, mean/std 0.5), the
SmolVLM-style tokenizer, a prompt rendered by our chat-template path: input_ids must be identical and
pixel_values equal to float32 rounding (both compute x * (1/255) in float64, then (x - 0.5) / 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3Processor as HFIdefics3Processor
from transformers import PreTrainedTokenizerFast
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vlmserve.inputs.chat_template import render_chat
from vlmserve.inputs.content import ParsedMessage
from vlmserve.inputs.idefics3 import Idefics3Processor
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.testing.smolvlm_checkpoint import smolvlm_256m_config, smolvlm_preprocessor_config

SENTINEL = "<|vlmserve-image-test|>"


@pytest.fixture(scope="module")
def processors(smolvlm_tokenizer_dir: Path) -> tuple[Idefics3Processor, HFIdefics3Processor]:
    tokenizer = load_tokenizer(smolvlm_tokenizer_dir)
    ours = Idefics3Processor(
        smolvlm_256m_config(), tokenizer, max_tiles=36, image_config=smolvlm_preprocessor_config()
    )
    image_processor = Idefics3ImageProcessorPil(**smolvlm_preprocessor_config())
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(smolvlm_tokenizer_dir))
    theirs = HFIdefics3Processor(image_processor, hf_tokenizer, image_seq_len=64)
    return ours, theirs


def gradient_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour ramps plus noise, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def render(tokenizer, items: list) -> str:
    messages = [ParsedMessage(role="user", items=items)]
    return render_chat(tokenizer, messages, sentinel=SENTINEL, completion_mode=False)


def compare(processors, images: list[Image.Image], items: list) -> list:
    ours, theirs = processors
    prompt_text = render(ours.tokenizer, items)
    processed = [ours.process(image) for image in images]
    ids, image_inputs = ours.build_prompt(prompt_text, SENTINEL, processed)
    expected = theirs(text=prompt_text.replace(SENTINEL, "<image>"), images=images)
    assert ids == expected["input_ids"][0]
    expected_pixels = torch.as_tensor(np.asarray(expected["pixel_values"]))[0]  # [tiles, 3, 512, 512]
    pixels = torch.cat([image.pixel_values for image in image_inputs])
    assert pixels.shape == expected_pixels.shape
    assert (pixels - expected_pixels).abs().max().item() <= 1e-6
    for image in image_inputs:  # each ImageInput's embed runs cover exactly its runs of <image> tokens
        assert ids[image.offset - 1] != ours.image_token_id
        assert ids[image.offset + image.length] != ours.image_token_id
        runs = image.embed_runs or ((0, image.length),)
        embedded = {image.offset + start + i for start, count in runs for i in range(count)}
        span = range(image.offset, image.offset + image.length)
        assert {p for p in span if ids[p] == ours.image_token_id} == embedded
    assert sum(image.num_embeds for image in image_inputs) == ids.count(ours.image_token_id)
    return image_inputs


@pytest.mark.parametrize(
    "width,height,num_tiles",
    [(2000, 100, 5), (100, 2000, 5), (30, 30, 17), (512, 512, 17), (1000, 700, 13), (777, 1001, 17)],
    ids=["wide-2000x100", "tall-100x2000", "small-30x30", "512x512", "1000x700", "777x1001"],
)
def test_single_image_matches_transformers(processors, width: int, height: int, num_tiles: int) -> None:
    image = gradient_image(width, height, seed=width + height)
    (image_input,) = compare(processors, [image], [image, "What is in this image?"])
    assert image_input.num_tiles == len(image_input.pixel_values) == num_tiles


def test_two_images_and_text_match_transformers(processors) -> None:
    images = [gradient_image(640, 200, seed=1), gradient_image(90, 120, seed=2)]
    compare(processors, images, ["Compare ", images[0], " with ", images[1], " please."])


def test_unsplit_image_matches_transformers(processors) -> None:
    """Longest edge 512 = the sub-image size: one 512 x 512 image, `<global-img>` only."""
    ours, theirs = processors
    config = smolvlm_preprocessor_config(longest_edge=512)
    ours = Idefics3Processor(smolvlm_256m_config(), ours.tokenizer, max_tiles=36, image_config=config)
    theirs = HFIdefics3Processor(Idefics3ImageProcessorPil(**config), theirs.tokenizer, image_seq_len=64)
    image = gradient_image(300, 200, seed=5)
    (image_input,) = compare((ours, theirs), [image], [image, "Describe."])
    assert image_input.pixel_values.shape == (1, 3, 512, 512)
