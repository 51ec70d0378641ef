"""GGUF import of SmolLM2-135M-Instruct: config, weights (un-permuted q/k) and the rebuilt tokenizer.

References used only here: transformers' LlamaForCausalLM (greedy generation with our weights), transformers'
own GGUF tokenizer conversion (ids on sample texts), and the GGUF vocabulary itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from vlmserve.errors import ModelLoadError
from vlmserve.models.default_model import IMAGE_TOKENS, smollm2_gguf_path
from vlmserve.models.gguf_import import (
    hf_weight_name,
    open_gguf,
    read_llama_config,
    read_llama_state_dict,
    unpermute_rope_rows,
)

SAMPLE_TEXTS = [
    "Hello world! What is the capital of France?",
    "In 2024, 12345 + 678 = 13023.",
    "  leading spaces\n\ttabs\r\nand  double  spaces ",
    "ünïcödé 日本語 Привет мир 🎉👍🏽 emoji 👨‍👩‍👧",
    "def f(x):\n    return x**2  # comment",
    "don't won't I'm they'll we've",
    "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def reader() -> Any:
    return open_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def llm_config(reader: Any) -> dict[str, Any]:
    return read_llama_config(reader)


@pytest.fixture(scope="module")
def state_dict(reader: Any) -> dict[str, torch.Tensor]:
    return read_llama_state_dict(reader)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_tokenizer_dir / "tokenizer.json"))


def test_llama_config_values(llm_config: dict[str, Any]) -> None:
    expected = {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {key: llm_config[key] for key in expected} == expected


def test_weights_have_hf_names_shapes_and_float32(state_dict: dict[str, torch.Tensor]) -> None:
    assert len(state_dict) == 2 + 30 * 9
    assert "lm_head.weight" not in state_dict  # tied embeddings
    assert state_dict["model.embed_tokens.weight"].shape == (49152, 576)
    assert state_dict["model.norm.weight"].shape == (576,)
    assert state_dict["model.layers.29.self_attn.q_proj.weight"].shape == (576, 576)
    assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state_dict["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert state_dict["model.layers.0.post_attention_layernorm.weight"].shape == (576,)
    assert all(t.dtype == torch.float32 for t in state_dict.values())


def test_weight_name_mapping() -> None:
    assert hf_weight_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_weight_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert hf_weight_name("output.weight") == "lm_head.weight"
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        hf_weight_name("rope_freqs.weight")


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # The row order llama.cpp's converter writes: within each head, halves interleaved.
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    per_head = weight.reshape(num_heads, 2, head_dim // 2, -1)
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_llama_cpp_row_order() -> None:
    weight = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    assert np.array_equal(unpermute_rope_rows(_llama_cpp_permute(weight, 6), 6), weight)
    # head 0 of 4 rows: GGUF rows [a0, b0, a1, b1] -> HF [a0, a1, b0, b1]
    rows = np.array([[0], [2], [1], [3]], dtype=np.float32)
    assert unpermute_rope_rows(rows, 1)[:, 0].tolist() == [0, 1, 2, 3]


def test_greedy_answer_mentions_paris(
    llm_config: dict[str, Any], state_dict: dict[str, torch.Tensor], smollm2_tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hf_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    model = LlamaForCausalLM(LlamaConfig(**llm_config)).eval()
    incompatible = model.load_state_dict(state_dict, strict=False)
    assert incompatible.unexpected_keys == [] and incompatible.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = hf_tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_ids_match_gguf_vocabulary(reader: Any, tokenizer: Tokenizer) -> None:
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert all(tokenizer.token_to_id(token) == i for i, token in enumerate(tokens))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 49152 + 3


def test_special_and_image_token_ids(tokenizer: Tokenizer) -> None:
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<img>": 49152, "</img>": 49153,
                "<image>": 49154}
    assert {token: tokenizer.token_to_id(token) for token in expected} == expected
    ids = tokenizer.encode("<img><image><image></img>\n<|im_end|>").ids
    assert ids[:5] == [49152, 49154, 49154, 49153, 198] and ids[-1] == 2


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(tokenizer: Tokenizer) -> None:
    # the smollm pre-tokenizer: each digit is its own token
    assert tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]


def test_ids_match_transformers_gguf_conversion(tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf_path()
    (tmp_path / gguf_path.name).symlink_to(gguf_path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    for text in SAMPLE_TEXTS:
        assert tokenizer.encode(text).ids == reference(text, add_special_tokens=False)["input_ids"], text


def test_tokenizer_config_files(smollm2_tokenizer_dir: Path) -> None:
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")
    assert config["additional_special_tokens"] == list(IMAGE_TOKENS)
    generation = json.loads((smollm2_tokenizer_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]
    special = json.loads((smollm2_tokenizer_dir / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>"


def test_chat_template_renders_chatml(smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert hf_tokenizer.convert_tokens_to_ids("<image>") == 49154
    assert hf_tokenizer.decode([49152, 49154, 49153]) == "<img><image></img>"


def test_llama31_fixture_tokenizer(llama31_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(llama31_tokenizer_dir))
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS] == [128256, 128257, 128258]
    assert hf_tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nHi"}], add_generation_prompt=True, tokenize=False
    )
    user_turn = "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi<|eot_id|>"
    assert text.startswith("<|begin_of_text|>" + user_turn)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = hf_tokenizer("<img><image></img>", add_special_tokens=False)["input_ids"]
    assert ids == [128256, 128258, 128257]


def test_llama31_fixture_matches_meta_tiktoken(llama31_tokenizer_dir: Path) -> None:
    # Meta's own tiktoken tokenizer, from the llama-models package, where it is installed.
    tiktoken_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
    reference = tiktoken_tokenizer.Tokenizer.get_instance()
    tokenizer = Tokenizer.from_file(str(llama31_tokenizer_dir / "tokenizer.json"))
    for text in SAMPLE_TEXTS[:-1]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(
            text, bos=False, eos=False
        ), text
