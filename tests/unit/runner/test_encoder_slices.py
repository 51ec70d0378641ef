"""ModelRunner with a tiny random Idefics3 (SmolVLM): all sub-images of an image go through the vision
tower in one call, their features land on the image runs only (the layout tokens between the runs
keep their embeddings), and encoding the tiles in slices over several steps (the encoder budget)
gives the logits of the unsliced step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.runner.test_model_runner import SpyModel, make_runner, new_request, scheduler_output
from vlmserve.engine.outputs import EncoderSlice, SchedulerOutput
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import ImageInput
from vlmserve.runner.encoder_cache import EncoderCache

NUM_TILES = 3
TOKENS_PER_TILE = 4  # the tiny config: 64 px sub-images, patch 16 -> 16 patches, pixel shuffle 2 -> 4


@pytest.fixture(scope="module")
def model(tiny_smolvlm_checkpoint_dir: Path) -> torch.nn.Module:
    return load_model(
        tiny_smolvlm_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False
    ).model


def split_image(seed: int = 0) -> tuple[list[int], ImageInput]:
    """A prompt with one 3-tile image whose runs are separated by two layout tokens each."""
    runs = tuple((tile * (TOKENS_PER_TILE + 2), TOKENS_PER_TILE) for tile in range(NUM_TILES))
    length = runs[-1][0] + TOKENS_PER_TILE
    span = [0] * length
    for tile, (start, _) in enumerate(runs):
        if tile:
            span[start - 2 : start] = [40 + tile, 50 + tile]  # row/col-like tags
    prompt = [11, 12, 13, *span, 14, 15]
    pixels = torch.rand(NUM_TILES, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return prompt, ImageInput(pixels, NUM_TILES, f"img-{seed}", offset=3, length=length, embed_runs=runs)


@torch.inference_mode()
def per_tile_reference(model: torch.nn.Module, prompt: list[int], image: ImageInput) -> torch.Tensor:
    """Last-position logits with each sub-image encoded alone (the layout before one ImageInput per
    image) and written over its own run, through the contiguous KV cache."""
    embeds = model.embed_tokens(torch.tensor(prompt))
    for tile, (start, count) in enumerate(image.embed_runs):
        row = image.offset + start
        embeds[row : row + count] = model.embed_images(image.pixel_values[tile : tile + 1])
    cache = model.make_kv_cache(len(prompt), dtype=torch.float32, device="cpu")
    return model.compute_logits(model(embeds, torch.arange(len(prompt)), cache)[-1:])[0]


def with_slices(output: SchedulerOutput, request_id: str, image: ImageInput, *tiles: tuple[int, int]):
    slices = [EncoderSlice(0, image, start, end) for start, end in tiles]
    return SchedulerOutput(
        **{
            name: getattr(output, name)
            for name in SchedulerOutput.__slots__
            if name != "scheduled_encoder_slices"
        },
        scheduled_encoder_slices={request_id: slices},
    )


def test_one_encoder_call_for_all_sub_images(model: torch.nn.Module) -> None:
    prompt, image = split_image()
    spy = SpyModel(model)
    runner = make_runner(model)
    runner.model = spy  # type: ignore[assignment]
    step = scheduler_output(
        new=[new_request("r", prompt, list(range(8)), images=[image])],
        num_scheduled={"r": len(prompt)},
        encoder_inputs={"r": [0]},
    )
    batch, logits = runner.compute_logits(step)
    assert batch is not None
    assert spy.num_embed_images == 1
    torch.testing.assert_close(logits[0], per_tile_reference(model, prompt, image), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_batched_tiles_equal_tiles_one_by_one(model: torch.nn.Module) -> None:
    _, image = split_image(seed=1)
    batched = model.embed_images(image.pixel_values)
    one_by_one = torch.cat([model.embed_images(image.pixel_values[i : i + 1]) for i in range(NUM_TILES)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)


def test_slices_over_steps_give_the_unsliced_logits(model: torch.nn.Module) -> None:
    prompt, image = split_image(seed=2)
    blocks = list(range(8))
    whole = scheduler_output(
        new=[new_request("r", prompt, blocks, images=[image])],
        num_scheduled={"r": len(prompt)},
        encoder_inputs={"r": [0]},
    )
    _, expected = make_runner(model).compute_logits(whole)

    spy = SpyModel(model)
    runner = make_runner(model)
    runner.model = spy  # type: ignore[assignment]
    # step 1: the first tile only; the request is not scheduled yet (no tokens)
    first = runner.execute(with_slices(SchedulerOutput.make_empty(), "r", image, (0, 1)))
    assert first.sampled_token_ids == {} and first.encoded_images == {}
    assert first.encoder_stats is not None and first.encoder_stats.encoder_seconds > 0
    # step 2: the other two tiles, then the whole prompt with the image in the same step
    batch, logits = runner.compute_logits(with_slices(whole, "r", image, (1, 3)))
    assert batch is not None and spy.num_embed_images == 2
    assert runner._encoder_work.completed == {"r": [0]}
    assert runner.held_images["r"] == {}  # taken by the chunk
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_a_cached_image_completes_on_its_first_slice(model: torch.nn.Module) -> None:
    _, image = split_image(seed=3)
    spy = SpyModel(model)
    runner = make_runner(model)
    runner.model = spy  # type: ignore[assignment]
    runner.encoder_cache = EncoderCache(1 << 20)
    runner.encoder_cache.put(image.content_hash, model.embed_images(image.pixel_values))
    output = runner.execute(with_slices(SchedulerOutput.make_empty(), "r", image, (0, 1)))
    assert output.encoded_images == {"r": [0]}
    assert spy.num_embed_images == 0
    assert output.encoder_stats is not None and output.encoder_stats.num_cache_hits == 1
    # the request's abort drops what the runner held for it
    finished = SchedulerOutput.make_empty()
    runner.execute(
        SchedulerOutput(
            **{**{n: getattr(finished, n) for n in SchedulerOutput.__slots__}, "finished_request_ids": {"r"}}
        )
    )
    assert "r" not in runner.held_images
