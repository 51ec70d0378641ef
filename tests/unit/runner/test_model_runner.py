"""ModelRunner over the paged KV pool on a tiny random Nemotron-VL: a mixed batch (prefill chunks and
decodes, an image, scattered block tables) gives the logits of each request run alone through the
contiguous KVCache path; the encoder cache skips the vision encoder for an image seen before."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from vlmserve.engine.outputs import NewRequestData, RunningRequestData, SchedulerOutput
from vlmserve.layers.attention import KVCacheSpec, PagedKVCache
from vlmserve.metrics.stats import EncoderStats
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import ImageInput, SamplingParams
from vlmserve.runner.encoder_cache import EncoderCache
from vlmserve.runner.model_runner import ModelRunner

BLOCK_SIZE = 4
NUM_BLOCKS = 64
ATOL = 1e-4  # float32


@pytest.fixture(scope="module")
def model(tiny_checkpoint_dir: Path) -> torch.nn.Module:
    return load_model(
        tiny_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False
    ).model


def make_runner(model: torch.nn.Module) -> ModelRunner:
    spec = KVCacheSpec.from_model(model, torch.float32)
    kv_cache = PagedKVCache.allocate(spec, NUM_BLOCKS, BLOCK_SIZE, device="cpu")
    return ModelRunner(model, kv_cache, device=torch.device("cpu"), dtype=torch.float32)


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, token_ids: list[int], images: list[ImageInput]) -> torch.Tensor:
    """The last position's logits [vocab] of the request run alone over a contiguous KVCache."""
    cache = model.make_kv_cache(len(token_ids), dtype=torch.float32, device="cpu")
    embeds = model.embed_tokens(torch.tensor(token_ids))
    for image in images:
        embeds[image.offset : image.offset + image.length] = model.embed_images(image.pixel_values)
    hidden = model(embeds, torch.arange(len(token_ids)), cache)
    return model.compute_logits(hidden[-1:])[0]


def new_request(request_id: str, prompt: list[int], block_ids: list[int], images=(), num_computed=0):
    return NewRequestData(
        request_id=request_id,
        prompt_token_ids=prompt,
        output_token_ids=[],
        sampling_params=SamplingParams(temperature=0.0),
        images=list(images),
        block_ids=block_ids,
        num_computed_tokens=num_computed,
    )


def scheduler_output(new=(), running=(), num_scheduled=None, encoder_inputs=None) -> SchedulerOutput:
    num_scheduled = num_scheduled or {}
    return SchedulerOutput(
        scheduled_new_requests=list(new),
        scheduled_running_requests=list(running),
        num_scheduled_tokens=num_scheduled,
        total_num_scheduled_tokens=sum(num_scheduled.values()),
        scheduled_encoder_inputs=encoder_inputs or {},
        preempted_request_ids=[],
        finished_request_ids=set(),
    )


def test_mixed_batch_matches_each_request_alone(model: torch.nn.Module) -> None:
    rng = random.Random(0)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)  # scattered, non-contiguous block tables

    def blocks(num_tokens: int) -> list[int]:
        return [free.pop() for _ in range(-(-num_tokens // BLOCK_SIZE))]

    prompts = {
        rid: [rng.randrange(10, 1000) for _ in range(n)]
        for rid, n in {"a": 10, "b": 13, "c": 5, "d": 9, "e": 17}.items()
    }
    torch.manual_seed(0)
    image = ImageInput(torch.rand(2, 3, 64, 64), num_tiles=2, content_hash="i", offset=3, length=8)
    table = {rid: blocks(len(prompt) + 1) for rid, prompt in prompts.items()}
    runner = make_runner(model)

    # step 1: a's first chunk (6 of 10) and the whole prompts of c, d, e
    step1 = scheduler_output(
        new=[new_request(rid, prompts[rid], table[rid]) for rid in "acde"],
        num_scheduled={"a": 6, "c": 5, "d": 9, "e": 17},
    )
    batch, logits = runner.compute_logits(step1)
    assert batch is not None and batch.sampled_request_ids == ["c", "d", "e"]
    for row, rid in enumerate(batch.sampled_request_ids):
        torch.testing.assert_close(logits[row], reference_logits(model, prompts[rid], []), atol=ATOL, rtol=0)
    sampled = runner.sample(batch, logits).sampled_token_ids

    # step 2: three decodes, a's second chunk (over its first, in the pool) and b whole, with an image
    step2 = scheduler_output(
        new=[new_request("b", prompts["b"], table["b"], images=[image])],
        running=[RunningRequestData(rid, [], n) for rid, n in [("a", 6), ("c", 5), ("d", 9), ("e", 17)]],
        num_scheduled={"a": 4, "b": 13, "c": 1, "d": 1, "e": 1},
        encoder_inputs={"b": [0]},
    )
    batch, logits = runner.compute_logits(step2)
    assert batch is not None
    assert batch.request_ids == ["c", "d", "e", "a", "b"]  # decodes first
    assert batch.attention.num_decodes == 3
    expected = {
        "a": reference_logits(model, prompts["a"], []),
        "b": reference_logits(model, prompts["b"], [image]),
        **{rid: reference_logits(model, prompts[rid] + [sampled[rid]], []) for rid in "cde"},
    }
    for row, rid in enumerate(batch.sampled_request_ids):
        torch.testing.assert_close(logits[row], expected[rid], atol=ATOL, rtol=0)


def test_prefix_hit_and_partial_chunks_sample_only_at_the_end(model: torch.nn.Module) -> None:
    """A request resumed over blocks another request computed (a prefix-cache hit) gives the same
    logits; a partial chunk samples nothing."""
    prompt = list(range(100, 120))
    runner = make_runner(model)
    first = runner.execute(
        scheduler_output(new=[new_request("x", prompt, list(range(6)))], num_scheduled={"x": 20})
    )
    # y shares x's first 4 blocks (16 tokens) and computes the rest in two chunks
    y_blocks = [0, 1, 2, 3, 10, 11]
    partial = runner.execute(
        scheduler_output(new=[new_request("y", prompt, y_blocks, num_computed=16)], num_scheduled={"y": 2})
    )
    assert partial.sampled_token_ids == {}
    last = runner.execute(scheduler_output(running=[RunningRequestData("y", [], 18)], num_scheduled={"y": 2}))
    assert last.sampled_token_ids == {"y": first.sampled_token_ids["x"]}


class SpyModel:
    """The model with embed_images counted (everything else passes through)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.num_embed_images = 0

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.num_embed_images += 1
        return self.model.embed_images(pixel_values)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def make_image(seed: int, offset: int) -> ImageInput:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return ImageInput(pixels, num_tiles=2, content_hash=f"image-{seed}", offset=offset, length=8)


def run_alone(runner: ModelRunner, request_id: str, prompt: list[int], image: ImageInput, blocks: list[int]):
    """Prefill of one request with one image: the logits of its last position and the step's output."""
    step = scheduler_output(
        new=[new_request(request_id, prompt, blocks, images=[image])],
        num_scheduled={request_id: len(prompt)},
        encoder_inputs={request_id: [0]},
    )
    batch, logits = runner.compute_logits(step)
    assert batch is not None
    return logits[0].clone(), runner.sample(batch, logits)


def test_encoder_cache_skips_the_encoder_for_an_image_sent_again(model: torch.nn.Module) -> None:
    """A second request with the same image after another prefix (no prefix-cache hit possible) takes
    the features from the encoder cache: embed_images is not called, and the logits equal a run
    without the cache."""
    first_prompt = [11, 12, 13, *[0] * 8, 14, 15]
    second_prompt = [21, 22, 23, 24, 25, *[0] * 8, 26]  # another question, the image further on
    spy = SpyModel(model)
    runner = make_runner(model)
    runner.model = spy  # type: ignore[assignment]
    runner.encoder_cache = EncoderCache(1 << 20)

    _, first = run_alone(runner, "a", first_prompt, make_image(0, offset=3), list(range(0, 4)))
    assert spy.num_embed_images == 1
    assert first.encoder_stats == EncoderStats(
        num_cache_misses=1,
        encoder_seconds=first.encoder_stats.encoder_seconds,
        cache_bytes=runner.encoder_cache.num_bytes,
    )
    cached_logits, second = run_alone(runner, "b", second_prompt, make_image(0, offset=5), list(range(4, 8)))
    assert spy.num_embed_images == 1  # not called again
    assert second.encoder_stats is not None and second.encoder_stats.num_cache_hits == 1
    assert second.encoder_stats.num_cache_misses == 0 and second.encoder_stats.encoder_seconds == 0.0

    uncached_logits, _ = run_alone(
        make_runner(model), "b", second_prompt, make_image(0, offset=5), [0, 1, 2, 3]
    )
    assert torch.equal(cached_logits, uncached_logits)


def test_encoder_cache_evicts_by_budget_and_off_still_works(model: torch.nn.Module) -> None:
    prompt = [11, 12, 13, *[0] * 8, 14]
    features_bytes = model.embed_images(make_image(0, 3).pixel_values).numel() * 4
    for budget, expected_calls in [(features_bytes, 3), (2 * features_bytes, 2), (0, 3)]:
        spy = SpyModel(model)
        runner = make_runner(model)
        runner.model = spy  # type: ignore[assignment]
        runner.encoder_cache = EncoderCache(budget)
        logits = []
        for i, seed in enumerate([0, 1, 0]):  # with room for one image, image 1 evicts image 0
            logits.append(
                run_alone(runner, f"r{i}", prompt, make_image(seed, 3), [4 * i + b for b in range(4)])[0]
            )
        assert spy.num_embed_images == expected_calls, budget
        assert runner.encoder_cache.num_bytes <= budget
        assert torch.equal(logits[0], logits[2])
