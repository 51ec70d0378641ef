"""Idefics3Processor without transformers: grid sizes, the tile budget, the prompt expansion, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlmserve.errors import InvalidRequestError
from vlmserve.inputs.idefics3 import Idefics3Processor, resize_to_longest_edge, resize_to_tile_multiple
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.testing.smolvlm_checkpoint import smolvlm_256m_config, smolvlm_preprocessor_config

SENTINEL = "<|img|>"


@pytest.fixture(scope="module")
def tokenizer(smolvlm_tokenizer_dir: Path):
    return load_tokenizer(smolvlm_tokenizer_dir)


def processor(tokenizer, max_tiles: int = 16, **settings) -> Idefics3Processor:
    config = {**smolvlm_preprocessor_config(), **settings}
    return Idefics3Processor(smolvlm_256m_config(), tokenizer, max_tiles=max_tiles, image_config=config)


@pytest.mark.parametrize(
    "size,first,second",
    [
        ((2000, 100), (102, 2048), (512, 2048)),
        ((100, 2000), (2048, 102), (2048, 512)),
        ((30, 30), (2048, 2048), (2048, 2048)),
        ((1000, 700), (1434, 2048), (1536, 2048)),
    ],
)
def test_resize_sizes(size: tuple[int, int], first: tuple[int, int], second: tuple[int, int]) -> None:
    width, height = size
    assert resize_to_longest_edge(height, width, 2048) == first
    assert resize_to_tile_multiple(*first, 512) == second


def test_tile_budget_lowers_the_longest_edge(tokenizer) -> None:
    proc = processor(tokenizer, max_tiles=12)
    assert proc.grid(1000, 1000)[:2] == (3, 3)  # 4 x 4 would exceed 12
    assert processor(tokenizer, max_tiles=16).grid(1000, 1000)[:2] == (4, 4)
    assert proc.grid(2000, 100)[:2] == (1, 4)
    assert proc.grid(1000, 1000, max_tiles=1)[:2] == (0, 0)  # detail low: the single 512 x 512 image
    image = proc.process(Image.new("RGB", (1000, 1000)), max_tiles=1)
    assert image.pixel_values.shape == (1, 3, 512, 512)


def test_settings_come_from_preprocessor_config_beside_the_tokenizer(
    tokenizer, smolvlm_tokenizer_dir
) -> None:
    proc = Idefics3Processor(smolvlm_256m_config(), tokenizer, max_tiles=16)
    assert (proc.tile_size, proc.longest_edge, proc.tokens_per_tile) == (512, 2048, 64)


def test_expansion_of_a_split_image(tokenizer) -> None:
    text = processor(tokenizer).expansion_text(1, 2)
    run = "<image>" * 64
    assert text == (
        f"<fake_token_around_image><row_1_col_1>{run}<fake_token_around_image><row_1_col_2>{run}\n"
        f"\n<fake_token_around_image><global-img>{run}<fake_token_around_image>"
    )


def test_one_image_input_per_image_with_embed_runs(tokenizer) -> None:
    """All sub-images in one ImageInput (one encoder call); its span covers the whole layout and
    embed_runs marks the `<image>` runs, so the row/col tags between them keep their embeddings."""
    proc = processor(tokenizer)
    image = proc.process(Image.new("RGB", (1000, 200), (10, 200, 30)))
    assert (image.rows, image.cols, image.num_tiles) == (1, 4, 5)
    ids, inputs = proc.build_prompt(f"User: {SENTINEL}\nHi<end_of_utterance>\nAssistant:", SENTINEL, [image])
    (image_input,) = inputs
    assert image_input.pixel_values.shape == (5, 3, 512, 512)
    assert (image_input.num_tiles, image_input.content_hash) == (5, image.content_hash)
    assert image_input.num_embeds == 5 * 64 == ids.count(proc.image_token_id)
    assert [count for _, count in image_input.embed_runs] == [64] * 5
    span = ids[image_input.offset : image_input.offset + image_input.length]
    assert span[0] == span[-1] == proc.image_token_id
    embed = [False] * image_input.length
    for index, (start, count) in enumerate(image_input.embed_runs):
        assert span[start : start + count] == [proc.image_token_id] * count
        embed[start : start + count] = [True] * count
        tag = "<global-img>" if index == 4 else f"<row_1_col_{index + 1}>"
        assert ids[image_input.offset + start - 1] == tokenizer.convert_tokens_to_ids(tag)
    # nothing but the layout tags lies between the runs
    assert proc.image_token_id not in [t for t, e in zip(span, embed, strict=True) if not e]


def test_unsplit_image_has_no_embed_runs(tokenizer) -> None:
    proc = processor(tokenizer)
    image = proc.process(Image.new("RGB", (40, 40)), max_tiles=1)
    ids, (image_input,) = proc.build_prompt(f"User: {SENTINEL}\nHi", SENTINEL, [image])
    assert (image_input.length, image_input.num_embeds, image_input.embed_runs) == (64, 64, ())
    assert ids[image_input.offset : image_input.offset + 64] == [proc.image_token_id] * 64


def test_image_token_in_text_is_refused(tokenizer) -> None:
    proc = processor(tokenizer)
    image = proc.process(Image.new("RGB", (40, 40)), max_tiles=1)
    with pytest.raises(InvalidRequestError, match="image token"):
        proc.build_prompt(f"User: {SENTINEL}\nwhat is <image>?", SENTINEL, [image])
