"""ModelRunner with structured output on a tiny random Nemotron-VL and the real SmolLM2 tokenizer: a
guided row samples only what its guide allows while a free row in the same batch keeps its argmax;
a guided request without a usable guide is reported as a guide error, not a crash of the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.runner.test_model_runner import BLOCK_SIZE, NUM_BLOCKS, scheduler_output
from vlmserve.bootstrap import logits_width
from vlmserve.engine.outputs import NewRequestData
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.layers.attention import KVCacheSpec, PagedKVCache
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import GuidedDecodingSpec, SamplingParams
from vlmserve.runner.model_runner import ModelRunner
from vlmserve.runner.structured_output import TokenizerInfo, build_tokenizer_info

CHOICE = GuidedDecodingSpec("choice", ("yes", "no"))


@pytest.fixture(scope="module")
def parts(tiny_checkpoint_dir: Path) -> dict[str, Any]:
    model = load_model(
        tiny_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False
    ).model
    tokenizer = load_tokenizer(tiny_checkpoint_dir)
    info = build_tokenizer_info(tokenizer, [tokenizer.eos_token_id], logits_width(model, torch.device("cpu")))
    return {"model": model, "tokenizer": tokenizer, "info": info}


def make_runner(model: torch.nn.Module, info: TokenizerInfo | None) -> ModelRunner:
    kv_cache = PagedKVCache.allocate(
        KVCacheSpec.from_model(model, torch.float32), NUM_BLOCKS, BLOCK_SIZE, device="cpu"
    )
    return ModelRunner(model, kv_cache, device=torch.device("cpu"), dtype=torch.float32, tokenizer_info=info)


def request(request_id: str, prompt: list[int], block_ids: list[int], guided: GuidedDecodingSpec | None):
    return NewRequestData(
        request_id=request_id,
        prompt_token_ids=prompt,
        output_token_ids=[],
        sampling_params=SamplingParams(temperature=0.0, guided=guided),
        images=[],
        block_ids=block_ids,
        num_computed_tokens=0,
    )


def test_guided_rows_sample_what_the_guide_allows_free_rows_their_argmax(parts: dict[str, Any]) -> None:
    tokenizer = parts["tokenizer"]
    prompt = tokenizer.encode("Is the sky blue? Answer yes or no.")
    blocks = -(-len(prompt) // BLOCK_SIZE)
    step = scheduler_output(
        new=[
            request("free", prompt, list(range(blocks)), None),
            request("guided", prompt, list(range(blocks, 2 * blocks)), CHOICE),
        ],
        num_scheduled={"free": len(prompt), "guided": len(prompt)},
    )
    runner = make_runner(parts["model"], parts["info"])
    batch, logits = runner.compute_logits(step)
    assert batch is not None
    output = runner.sample(batch, logits)
    # the same prompt: one logits row, two answers
    free_row = batch.sampled_request_ids.index("free")
    assert output.sampled_token_ids["free"] == int(logits[free_row].argmax())
    first_tokens = {tokenizer.encode(word)[0] for word in ("yes", "no")} | {
        token_id for token_id in range(len(tokenizer)) if tokenizer.decode([token_id]) in ("y", "n", "ye")
    }
    assert output.sampled_token_ids["free"] not in first_tokens  # so the mask had to change the answer
    assert output.sampled_token_ids["guided"] in first_tokens
    assert not output.guide_errors
    assert output.guides_finished <= {"guided"}


def test_a_guided_request_without_a_guide_is_a_guide_error(parts: dict[str, Any]) -> None:
    prompt = parts["tokenizer"].encode("Hello")
    step = scheduler_output(
        new=[request("g", prompt, [0, 1], CHOICE)],
        num_scheduled={"g": len(prompt)},
    )
    runner = make_runner(parts["model"], None)  # no tokenizer info: nothing to compile the spec against
    output = runner.execute(step)
    assert "g" in output.sampled_token_ids
    assert output.guide_errors == {"g": "this engine has no tokenizer for structured output"}
