"""Our Llama decoder vs transformers' LlamaForCausalLM on a tiny random config, fp32, same weights by name."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from vlmserve.models.config import parse_llama_config
from vlmserve.models.llama import LlamaForCausalLM

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so the tiny head_dim spans all three llama3 frequency bands
    "original_max_position_embeddings": 64,
}


def tiny_llm_config(*, rope_scaling: dict[str, Any] | None, tie_word_embeddings: bool) -> dict[str, Any]:
    return {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
    }


def build_pair(config: dict[str, Any], seed: int = 0) -> tuple[LlamaForCausalLM, Any]:
    """(ours, theirs) with identical weights, initialised with std 0.2 so greedy picks are decisive."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config, attn_implementation="eager")
    hf_config.initializer_range = 0.2
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    ours = LlamaForCausalLM(parse_llama_config(config)).eval()
    hf_state = theirs.state_dict()
    ours.load_state_dict({name: hf_state[name] for name in ours.state_dict()}, strict=True)
    return ours, theirs


@torch.no_grad()
def our_logits(model: LlamaForCausalLM, input_ids: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """input_ids [T] -> logits [T, vocab], prefilled in `chunks` pieces through one KV cache."""
    cache = model.make_kv_cache(64, dtype=torch.float32, device="cpu")
    positions = torch.arange(input_ids.shape[0])
    outputs = []
    for ids, pos in zip(input_ids.chunk(chunks), positions.chunk(chunks), strict=True):
        outputs.append(model.compute_logits(model(model.embed_tokens(ids), pos, cache)))
    return torch.cat(outputs)


PROMPT = torch.tensor([3, 17, 99, 4, 5, 64, 21, 8, 120, 7, 33, 2, 90, 41, 11, 6, 77, 1, 56, 30])


@pytest.mark.parametrize("rope_scaling", [LLAMA3_ROPE, None], ids=["llama3-rope", "plain-rope"])
@pytest.mark.parametrize("tie_word_embeddings", [False, True], ids=["untied", "tied"])
def test_prompt_logits_match(rope_scaling: dict[str, Any] | None, tie_word_embeddings: bool) -> None:
    ours, theirs = build_pair(
        tiny_llm_config(rope_scaling=rope_scaling, tie_word_embeddings=tie_word_embeddings)
    )
    if tie_word_embeddings:
        assert ours.lm_head is None
    with torch.no_grad():
        expected = theirs(PROMPT[None]).logits[0].float()  # [T, vocab]
    actual = our_logits(ours, PROMPT)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_single_prefill() -> None:
    ours, _ = build_pair(tiny_llm_config(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False))
    single = our_logits(ours, PROMPT, chunks=1)
    chunked = our_logits(ours, PROMPT, chunks=2)
    assert (single - chunked).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_hf_generate() -> None:
    ours, theirs = build_pair(tiny_llm_config(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False), seed=1)
    num_new = 10
    expected = theirs.generate(
        PROMPT[None], max_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, PROMPT.shape[0] :].tolist()

    cache = ours.make_kv_cache(64, dtype=torch.float32, device="cpu")
    hidden = ours(ours.embed_tokens(PROMPT), torch.arange(PROMPT.shape[0]), cache)  # prefill
    generated = [int(ours.compute_logits(hidden[-1:]).argmax(-1))]
    while len(generated) < num_new:  # decode one token at a time
        position = torch.tensor([PROMPT.shape[0] + len(generated) - 1])
        hidden = ours(ours.embed_tokens(torch.tensor(generated[-1:])), position, cache)
        generated.append(int(ours.compute_logits(hidden).argmax(-1)))
    assert generated == expected


def test_bfloat16_runs_close_to_float32() -> None:
    ours, _ = build_pair(tiny_llm_config(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False))
    reference = our_logits(ours, PROMPT)
    ours_bf16 = ours.to(torch.bfloat16)
    cache = ours_bf16.make_kv_cache(64, dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        hidden = ours_bf16(ours_bf16.embed_tokens(PROMPT), torch.arange(PROMPT.shape[0]), cache)
        logits = ours_bf16.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max().item() < 0.1 * reference.abs().max().item()
