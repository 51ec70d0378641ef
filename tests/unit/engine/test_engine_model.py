"""The whole engine (AsyncEngine -> EngineCore -> Scheduler -> ModelRunner over the paged pool) on a
tiny random Nemotron-VL: concurrent requests generate what each generates alone, aborts free their
blocks, the prefix cache serves identical prompts and keeps prompts with different images apart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve.bootstrap import build_engine
from vlmserve.config import ServerConfig
from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import EngineRequest, SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 128
SENTINEL = "\x00IMAGE\x00"


@pytest.fixture(scope="module")
def parts(tiny_checkpoint_dir: Path) -> dict[str, Any]:
    loaded = load_model(tiny_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    tokenizer = load_tokenizer(tiny_checkpoint_dir)
    processor = NemotronVLProcessor(loaded.raw_config, tokenizer, max_tiles=2)
    return {"model": loaded.model, "tokenizer": tokenizer, "processor": processor}


def make_engine(parts: dict[str, Any], *, prefix_caching: bool = True, budget: int = 24) -> AsyncEngine:
    config = ServerConfig(
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        enable_prefix_caching=prefix_caching,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
        max_tiles=2,
    )
    return build_engine(
        config,
        parts["model"],
        parts["tokenizer"],
        eos=set(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=256,
        max_image_tokens=12,
    )


def make_request(parts: dict[str, Any], request_id: str, text: str, seed: int | None = None) -> EngineRequest:
    """A prompt of `text`; with `seed`, a random 64x128 image (2 tiles + thumbnail) in the middle."""
    images = []
    if seed is not None:
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 128, 3), dtype=np.uint8)
        images = [parts["processor"].process(Image.fromarray(pixels))]
        text = f"{text[:7]}{SENTINEL}{text[7:]}"
    prompt_token_ids, image_inputs = parts["processor"].build_prompt(text, SENTINEL, images)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return EngineRequest(request_id, prompt_token_ids, params, image_inputs)


async def generate(engine: AsyncEngine, request: EngineRequest) -> list[int]:
    return [token for output in [o async for o in engine.generate(request)] for token in output.new_token_ids]


def record_prefix_hits(engine: AsyncEngine) -> list[int]:
    """Prefix-cache hit tokens of every step from now on (the core keeps only the last step's stats)."""
    hits: list[int] = []
    scheduler = engine.core.scheduler
    make_stats = scheduler.make_stats

    def recording():
        stats = make_stats()
        hits.append(stats.prefix_cache_hits)
        return stats

    scheduler.make_stats = recording
    return hits


def record_steps(engine: AsyncEngine) -> list[dict[str, int]]:
    """num_scheduled_tokens of every step from now on."""
    steps: list[dict[str, int]] = []
    scheduler = engine.core.scheduler
    schedule = scheduler.schedule

    def recording():
        output = schedule()
        steps.append(dict(output.num_scheduled_tokens))
        return output

    scheduler.schedule = recording
    return steps


def assert_all_blocks_free(engine: AsyncEngine) -> None:
    manager = engine.core.scheduler.kv_cache_manager
    assert manager.num_free_blocks == NUM_BLOCKS, "blocks still held"
    assert manager.req_to_blocks == {}


TEXTS = [
    "Describe the picture in a few words, please.",
    "What colour is the sky on a clear day? Answer briefly and then explain why.",
    "Count the objects you can see here.",
    "Hello!",
]


async def test_concurrent_requests_generate_what_each_generates_alone(parts: dict[str, Any]) -> None:
    requests = [
        make_request(parts, f"r{i}", text, seed=i if i % 2 == 0 else None) for i, text in enumerate(TEXTS)
    ]
    assert requests[0].images and requests[2].images and not requests[1].images
    alone_engine = make_engine(parts, prefix_caching=False)
    alone = [await generate(alone_engine, request) for request in requests]
    await alone_engine.aclose()

    engine = make_engine(parts)  # a 24-token budget: chunked prefills share steps with decodes
    steps = record_steps(engine)
    together = await asyncio.gather(*(generate(engine, request) for request in requests))
    assert together == alone
    assert any(1 in step.values() and max(step.values()) > 1 for step in steps), "no mixed step"
    assert any(len(step) >= 3 for step in steps)
    assert all(len(tokens) == 8 for tokens in together)
    assert_all_blocks_free(engine)
    await engine.aclose()


async def test_abort_frees_the_blocks(parts: dict[str, Any]) -> None:
    engine = make_engine(parts)
    request = make_request(parts, "long", TEXTS[1], seed=5)
    request = EngineRequest(
        request.request_id,
        request.prompt_token_ids,
        SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True),
        request.images,
    )
    stream = engine.generate(request)
    await stream.__anext__()
    assert engine.core.scheduler.kv_cache_manager.num_free_blocks < NUM_BLOCKS
    await stream.aclose()  # a client disconnect
    for _ in range(200):
        if engine.core.num_unfinished == 0:
            break
        await asyncio.sleep(0.01)
    assert_all_blocks_free(engine)
    await engine.aclose()


async def test_prefix_cache_hit_gives_identical_output(parts: dict[str, Any]) -> None:
    engine = make_engine(parts)
    hits = record_prefix_hits(engine)
    first = await generate(engine, make_request(parts, "first", TEXTS[1], seed=7))
    assert sum(hits) == 0
    second_request = make_request(parts, "second", TEXTS[1], seed=7)
    second = await generate(engine, second_request)
    # every full block but the one holding the last prompt token comes from the cache
    num_prompt = len(second_request.prompt_token_ids)
    assert sum(hits) == (num_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert second == first
    await engine.aclose()


async def test_prompts_differing_only_in_the_image_share_no_image_blocks(parts: dict[str, Any]) -> None:
    engine = make_engine(parts)
    hits = record_prefix_hits(engine)
    first_request = make_request(parts, "first", TEXTS[0], seed=1)
    second_request = make_request(parts, "second", TEXTS[0], seed=2)
    assert first_request.prompt_token_ids == second_request.prompt_token_ids  # same ids, other pixels
    await generate(engine, first_request)
    second = await generate(engine, second_request)
    # only the blocks wholly before the image are shared
    image = second_request.images[0]
    assert sum(hits) == image.offset // BLOCK_SIZE * BLOCK_SIZE

    alone_engine = make_engine(parts, prefix_caching=False)
    assert second == await generate(alone_engine, second_request)
    await alone_engine.aclose()
    await engine.aclose()
