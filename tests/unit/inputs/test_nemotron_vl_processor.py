from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from tests.unit.inputs.helpers import NEMOTRON_CONFIG, SMALL_TILE_CONFIG
from vlmserve.errors import InvalidRequestError, ModelLoadError
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.tokenizer import load_tokenizer


def reference_grid(width: int, height: int, max_num: int, image_size: int) -> tuple[int, int]:
    """A plain transcription of the Nemotron-VL tiling rule (vLLM's port of the Hub processor)."""
    target_ratios = {
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if 1 <= i * j <= max_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    area = width * height
    best_factor, best_ratio = float("-inf"), (1, 1)
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        factor_based_on_area = min((ratio[0] * ratio[1] * image_size * image_size) / area, 0.6)
        closeness = min(target_aspect_ratio / aspect_ratio, aspect_ratio / target_aspect_ratio)
        factor = factor_based_on_area * closeness
        if factor > best_factor:
            best_factor, best_ratio = factor, ratio
    return best_ratio


def reference_num_tiles(width: int, height: int, max_num: int = 12, image_size: int = 512) -> int:
    cols, rows = reference_grid(width, height, max_num, image_size)
    blocks = cols * rows
    return blocks + 1 if blocks != 1 else blocks


# (width, height, tiles with the thumbnail), checked by hand and against the transcription above
TILE_TABLE = [
    (512, 512, 1),  # the Hub copy that upsamples 2x first gives 5 here: we follow vLLM (see module docstring)
    (1024, 512, 3),
    (512, 1024, 3),
    (4000, 200, 13),
    (200, 4000, 13),
    (10, 10, 1),
    (1, 1, 1),
    (1, 5000, 13),
    (1000, 1000, 5),
    (1920, 1080, 9),
    (1080, 1920, 9),
    (800, 600, 13),
    (300, 200, 7),
    (2048, 2048, 10),
    (4096, 512, 9),
    (3000, 3000, 13),
    (6000, 4000, 13),
]


@pytest.mark.parametrize(("width", "height", "expected"), TILE_TABLE)
def test_tile_count_table(processor: NemotronVLProcessor, width: int, height: int, expected: int) -> None:
    assert reference_num_tiles(width, height) == expected
    assert processor.num_tiles(width, height) == expected


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 8, 12, 16])
def test_tile_count_matches_reference_on_random_sizes(tiny_tokenizer: Any, max_tiles: int) -> None:
    processor = NemotronVLProcessor(NEMOTRON_CONFIG, tiny_tokenizer, max_tiles=max_tiles)
    rng = random.Random(max_tiles)
    sizes = [(rng.randint(1, 8000), rng.randint(1, 8000)) for _ in range(300)]
    sizes += [(s, s) for s in range(256, 8192, 97)]  # square images hit the ties between grids of one area
    for width, height in sizes:
        assert processor.grid(width, height) == reference_grid(width, height, max_tiles, 512), (width, height)
        assert processor.num_tiles(width, height) == reference_num_tiles(width, height, max_tiles)
        assert processor.num_tiles(width, height) <= max_tiles + (1 if max_tiles > 1 else 0)


def test_no_thumbnail_when_disabled(tiny_tokenizer: Any) -> None:
    processor = NemotronVLProcessor(NEMOTRON_CONFIG | {"use_thumbnail": False}, tiny_tokenizer, max_tiles=12)
    assert processor.num_tiles(1024, 512) == 2
    assert processor.preprocess(Image.new("RGB", (1024, 512))).shape == (2, 3, 512, 512)


def test_tokens_per_tile(tiny_tokenizer: Any) -> None:
    assert NemotronVLProcessor(NEMOTRON_CONFIG, tiny_tokenizer, max_tiles=12).tokens_per_tile == 256
    assert NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12).tokens_per_tile == 4


def test_pixel_tensor_shape_range_and_tile_order(processor: NemotronVLProcessor) -> None:
    image = Image.new("RGB", (1024, 512), (255, 0, 0))
    image.paste((0, 0, 255), (512, 0, 1024, 512))
    pixel_values = processor.preprocess(image)
    assert pixel_values.shape == (3, 3, 512, 512) and pixel_values.dtype == torch.float32
    assert float(pixel_values.min()) >= 0.0 and float(pixel_values.max()) <= 1.0
    assert torch.equal(pixel_values[0, :, 256, 100], torch.tensor([1.0, 0.0, 0.0]))  # left tile red
    assert torch.equal(pixel_values[1, :, 256, 400], torch.tensor([0.0, 0.0, 1.0]))  # right tile blue
    thumbnail = pixel_values[2]
    assert torch.equal(thumbnail[:, 256, 10], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(thumbnail[:, 256, 500], torch.tensor([0.0, 0.0, 1.0]))


def test_pixels_equal_bicubic_resize_then_crop(tiny_tokenizer: Any) -> None:
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    cols, rows = reference_grid(90, 50, 12, 32)
    resized = np.asarray(image.resize((cols * 32, rows * 32), Image.Resampling.BICUBIC))
    expected = [resized[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] for r in range(rows) for c in range(cols)]
    expected.append(np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)))
    expected_tensor = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 255.0
    assert torch.allclose(processor.preprocess(image), expected_tensor, atol=0, rtol=0)


def test_content_hash(processor: NemotronVLProcessor, tiny_tokenizer: Any) -> None:
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    same = Image.new("RGB", (40, 30), (1, 2, 3))
    other = Image.new("RGB", (40, 30), (1, 2, 4))
    assert processor.content_hash(image) == processor.content_hash(same)
    assert processor.content_hash(image) != processor.content_hash(other)
    fewer_tiles = NemotronVLProcessor(NEMOTRON_CONFIG, tiny_tokenizer, max_tiles=6)
    assert processor.content_hash(image) != fewer_tiles.content_hash(image)
    assert len(processor.content_hash(image)) == 64


@pytest.mark.parametrize("budget", [1, 2, 5, 12])
def test_per_image_budget_equals_a_processor_built_with_it(tiny_tokenizer: Any, budget: int) -> None:
    full = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12)
    limited = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=budget)
    rng = np.random.default_rng(budget)
    image = Image.fromarray(rng.integers(0, 256, (50, 130, 3), dtype=np.uint8))
    for width, height in [(130, 50), (33, 400), (1000, 1000), (64, 32)]:
        assert full.num_tiles(width, height, max_tiles=budget) == limited.num_tiles(width, height)
    processed, expected = full.process(image, max_tiles=budget), limited.process(image)
    assert processed.num_tiles == expected.num_tiles
    assert torch.equal(processed.pixel_values, expected.pixel_values)
    assert processed.content_hash == expected.content_hash
    assert full.process(image, max_tiles=12).content_hash == full.process(image).content_hash


def test_budget_of_one_is_the_whole_image_resized(tiny_tokenizer: Any) -> None:
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 200, 3), dtype=np.uint8))
    low, high = processor.process(image, max_tiles=1), processor.process(image)
    assert low.num_tiles == 1 and high.num_tiles > 1
    thumbnail = np.array(image.resize((32, 32), Image.Resampling.BICUBIC))
    assert torch.equal(low.pixel_values[0], torch.from_numpy(thumbnail).permute(2, 0, 1).float() / 255.0)
    # the same pixels at another budget are another cache key
    assert low.content_hash != high.content_hash


def test_image_token_ids(processor: NemotronVLProcessor, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = processor.image_token_ids(3)
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<img>")
    assert ids[-1] == tiny_tokenizer.convert_tokens_to_ids("</img>")
    assert ids[1:-1] == [tiny_tokenizer.convert_tokens_to_ids("<image>")] * 768


def _hf_expanded_ids(
    tokenizer: Any, text_with_placeholders: str, tiles: list[int], tokens_per_tile: int
) -> list[int]:
    """The HF path: replace each "<image>\\n" by <img> + <image> * N + </img>\\n, tokenize the whole text."""
    parts = text_with_placeholders.split("<image>\n")
    assert len(parts) == len(tiles) + 1
    text = parts[0]
    for num_tiles, part in zip(tiles, parts[1:], strict=True):
        text += "<img>" + "<image>" * (num_tiles * tokens_per_tile) + "</img>\n" + part
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(params=["tiny", "smollm2"])
def any_tokenizer(request: pytest.FixtureRequest, tiny_tokenizer: Any) -> Any:
    if request.param == "tiny":
        return tiny_tokenizer
    directory: Path = request.getfixturevalue("smollm2_tokenizer_dir")
    return load_tokenizer(directory)


def test_build_prompt_equals_hf_text_replacement(any_tokenizer: Any) -> None:
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, any_tokenizer, max_tiles=12)
    images = [processor.process(Image.new("RGB", size, (9, 9, 9))) for size in [(32, 32), (64, 32), (20, 90)]]
    sentinel = "<|S|>"
    template = (
        "<|begin_of_text|>system\n\nBe brief.<|eot_id|>user\n\n{0}\nWhat is this?  {0}\n\n"
        "and this{0}\n<|eot_id|>assistant\n\n"
    )
    ids, inputs = processor.build_prompt(template.format(sentinel), sentinel, images)
    tiles = [image.num_tiles for image in images]
    assert tiles == [1, 3, reference_num_tiles(20, 90, image_size=32)]
    expected = _hf_expanded_ids(any_tokenizer, template.format("<image>"), tiles, processor.tokens_per_tile)
    assert ids == expected
    for image_input, num_tiles in zip(inputs, tiles, strict=True):
        assert image_input.length == num_tiles * 4 and image_input.num_tiles == num_tiles
        assert ids[image_input.offset - 1] == processor.image_start_id
        span = ids[image_input.offset:image_input.offset + image_input.length]
        assert set(span) == {processor.image_token_id}
        assert ids[image_input.offset + image_input.length] == processor.image_end_id


def test_text_spelling_the_image_token_is_refused(processor: NemotronVLProcessor) -> None:
    image = processor.process(Image.new("RGB", (8, 8)))
    with pytest.raises(InvalidRequestError, match="image token"):
        processor.build_prompt("user: <image> sneaky <S>\n", "<S>", [image])


def test_sentinel_count_mismatch_is_refused(processor: NemotronVLProcessor) -> None:
    image = processor.process(Image.new("RGB", (8, 8)))
    with pytest.raises(InvalidRequestError, match="kept 0 of 1"):
        processor.build_prompt("no sentinel here", "<S>", [image])


def test_missing_config_key_and_tokens(tiny_tokenizer: Any) -> None:
    with pytest.raises(ModelLoadError, match="force_image_size"):
        NemotronVLProcessor({"patch_size": 16, "downsample_ratio": 0.5}, tiny_tokenizer, max_tiles=12)
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    no_image_tokens = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(ModelLoadError, match="<img>"):
        NemotronVLProcessor(NEMOTRON_CONFIG, no_image_tokens, max_tiles=12)
