"""Structured output through the whole engine (AsyncEngine -> Scheduler -> ModelRunner -> Sampler) on a
tiny random Nemotron-VL with the real SmolLM2 tokenizer: guided and free requests share batches, every
guided output parses and validates, a complete guide stops the request (ignore_eos or not), max_tokens
first gives LENGTH, a guide survives preemption, and free requests generate what they generate alone."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from tests.fixtures.guided import CHOICES, GRAMMAR, GRAMMAR_TEXT, ISO_DATE, SCHEMA
from vlmserve.bootstrap import build_engine, logits_width
from vlmserve.config import ServerConfig
from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    GuidedDecodingSpec,
    SamplingParams,
)
from vlmserve.runner.structured_output import build_tokenizer_info

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def parts(tiny_checkpoint_dir: Path) -> dict[str, Any]:
    loaded = load_model(tiny_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    tokenizer = load_tokenizer(tiny_checkpoint_dir)
    eos = {tokenizer.eos_token_id}
    info = build_tokenizer_info(tokenizer, eos, logits_width(loaded.model, torch.device("cpu")))
    return {"model": loaded.model, "tokenizer": tokenizer, "eos": eos, "info": info}


def make_engine(parts: dict[str, Any], *, num_blocks: int = 512, max_model_len: int = 1024) -> AsyncEngine:
    config = ServerConfig(
        block_size=BLOCK_SIZE, num_kv_blocks=num_blocks, max_num_batched_tokens=32, max_num_seqs=8
    )
    return build_engine(
        config,
        parts["model"],
        parts["tokenizer"],
        parts["eos"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=max_model_len,
        max_image_tokens=12,
        tokenizer_info=parts["info"],
    )


def make_request(
    parts: dict[str, Any], request_id: str, guided: GuidedDecodingSpec | None, **params: Any
) -> EngineRequest:
    prompt = parts["tokenizer"].encode(f"Request {request_id}: answer in the requested format.")
    defaults: dict[str, Any] = {"temperature": 0.0, "max_tokens": 600}
    return EngineRequest(request_id, prompt, SamplingParams(**{**defaults, **params, "guided": guided}))


async def run(engine: AsyncEngine, request: EngineRequest) -> tuple[str, EngineOutput]:
    outputs = [output async for output in engine.generate(request)]
    return "".join(output.text for output in outputs), outputs[-1]


def schema_spec() -> GuidedDecodingSpec:
    return GuidedDecodingSpec("json", json.dumps(SCHEMA))


async def test_guided_and_free_requests_share_batches(parts: dict[str, Any]) -> None:
    free = [make_request(parts, f"free{i}", None, max_tokens=12, ignore_eos=True) for i in range(2)]
    alone_engine = make_engine(parts)
    alone = [await run(alone_engine, request) for request in free]
    await alone_engine.aclose()

    guided = [
        make_request(parts, "json", schema_spec()),
        make_request(parts, "json-sampled", schema_spec(), temperature=1.0, seed=3),
        make_request(parts, "object", GuidedDecodingSpec("json_object", ""), temperature=1.0, seed=4),
        make_request(parts, "date", GuidedDecodingSpec("regex", ISO_DATE), temperature=1.0, seed=5),
        make_request(parts, "choice", GuidedDecodingSpec("choice", CHOICES), temperature=1.0, seed=6),
        make_request(parts, "grammar", GuidedDecodingSpec("grammar", GRAMMAR), temperature=1.0, seed=7),
    ]
    engine = make_engine(parts)
    sizes: list[int] = []
    sample = engine.core.runner.sample

    def recording(batch: Any, logits: torch.Tensor) -> Any:
        sizes.append(logits.shape[0])
        return sample(batch, logits)

    engine.core.runner.sample = recording  # type: ignore[method-assign]
    results = await asyncio.gather(*(run(engine, request) for request in [*free, *guided]))
    await engine.aclose()
    assert max(sizes) >= 6, "guided and free requests never shared a step"

    assert [text for text, _ in results[:2]] == [text for text, _ in alone]
    texts = {request.request_id: result for request, result in zip(guided, results[2:], strict=True)}
    for request_id, (text, final) in texts.items():
        # the "object" guide allows any JSON object: a random model may fill it until max_tokens
        if request_id != "object":
            assert final.finish_reason is FinishReason.STOP, (request_id, text, final)
    jsonschema.validate(json.loads(texts["json"][0]), SCHEMA)
    jsonschema.validate(json.loads(texts["json-sampled"][0]), SCHEMA)
    if texts["object"][1].finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(texts["object"][0]), dict)
    assert re.fullmatch(ISO_DATE, texts["date"][0])
    assert texts["choice"][0] in CHOICES
    assert GRAMMAR_TEXT.fullmatch(texts["grammar"][0])


async def test_a_complete_guide_stops_even_with_ignore_eos(parts: dict[str, Any]) -> None:
    engine = make_engine(parts)
    request = make_request(parts, "c", GuidedDecodingSpec("choice", CHOICES), ignore_eos=True, max_tokens=50)
    text, final = await run(engine, request)
    await engine.aclose()
    assert text in CHOICES
    assert final.finish_reason is FinishReason.STOP
    assert final.num_output_tokens < 50


async def test_max_tokens_before_the_guide_completes_is_length(parts: dict[str, Any]) -> None:
    engine = make_engine(parts)
    text, final = await run(
        engine, make_request(parts, "d", GuidedDecodingSpec("regex", ISO_DATE), max_tokens=2)
    )
    await engine.aclose()
    assert final.finish_reason is FinishReason.LENGTH
    assert final.num_output_tokens == 2
    assert re.fullmatch(r"[0-9]{1,2}", text), text  # a prefix of a date


async def test_logit_bias_cannot_break_the_guide(parts: dict[str, Any]) -> None:
    tokenizer = parts["tokenizer"]
    yes_id = tokenizer.encode("yes")[0]
    no_id = tokenizer.encode("no")[0]
    engine = make_engine(parts)
    spec = GuidedDecodingSpec("choice", ("yes", "no"))
    # a huge bias on "no" wins within the allowed tokens; one on a token the guide forbids does nothing
    forbidden = tokenizer.encode("{")[0]
    text, _ = await run(
        engine, make_request(parts, "b", spec, logit_bias=((no_id, 100.0), (forbidden, 100.0)))
    )
    assert text == "no"
    text, _ = await run(
        engine, make_request(parts, "y", spec, logit_bias=((yes_id, 100.0), (forbidden, 100.0)))
    )
    assert text == "yes"
    await engine.aclose()


async def test_a_guide_survives_preemption(parts: dict[str, Any]) -> None:
    """A pool too small for all requests at once: the latest arrivals are preempted and recomputed;
    their guides (which saw the tokens they resume with) carry on and the outputs still validate."""
    engine = make_engine(parts, num_blocks=90, max_model_len=300)
    preemptions: list[int] = []
    make_stats = engine.core.scheduler.make_stats

    def recording() -> Any:
        stats = make_stats()
        preemptions.append(stats.num_preemptions)
        return stats

    engine.core.scheduler.make_stats = recording  # type: ignore[method-assign]
    requests = [
        make_request(parts, f"p{i}", schema_spec(), temperature=1.0, seed=i, max_tokens=280) for i in range(4)
    ]
    results = await asyncio.gather(*(run(engine, request) for request in requests))
    await engine.aclose()
    assert sum(preemptions) > 0, "nothing was preempted: the pool is too large for this test"
    for text, final in results:
        assert final.finish_reason is FinishReason.STOP, (text, final)
        jsonschema.validate(json.loads(text), SCHEMA)
