"""Import a llama-architecture GGUF into Hugging Face form: LlamaConfig dict, HF-named weights, tokenizer.

Owns reading GGUF metadata and tensors (dequantized to float32, llama.cpp's Q/K row permutation undone)
and rebuilding a `tokenizers` byte-level BPE tokenizer plus its config files from the GGUF vocabulary.
It writes files only where told and knows nothing about the VLM around the language model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from vlmserve.errors import ModelLoadError

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path) -> GGUFReader:
    """Open (memory-map) a GGUF file; ModelLoadError when it is missing or not GGUF."""
    try:
        return GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read as GGUF: {e}") from e


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelLoadError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Keep the shortest float32 repr.
    return float(str(np.float32(value)))


def read_llama_config(reader: GGUFReader) -> dict[str, Any]:
    """The LlamaConfig (as a dict, HF keys) of a GGUF whose general.architecture is llama."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    num_heads = int(_field(reader, "llama.attention.head_count"))
    hidden_size = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden_size // num_heads)),
        "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
    }


def _optional_int(reader: GGUFReader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else int(field.contents())


def hf_weight_name(gguf_name: str) -> str:
    """The HF Llama name of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    match = _BLOCK_PATTERN.fullmatch(gguf_name)
    if match is not None:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    else:
        stem, _, kind = gguf_name.rpartition(".")
        if stem in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of q/k projection rows.

    HF Llama applies rope to the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs, so
    its converter reorders each head's rows from [half0..., half1...] to interleaved [h0_0, h1_0, h0_1, ...].
    Here the rows of each head, read as [head_dim/2, 2], are transposed back to [2, head_dim/2].
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, in_features)
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(out_features, in_features))


def read_llama_state_dict(reader: GGUFReader) -> dict[str, torch.Tensor]:
    """All tensors of a llama GGUF as float32 torch tensors under HF LlamaForCausalLM names.

    Quantized tensors (Q8_0, Q4_1, ...) are dequantized with gguf.quants; q_proj/k_proj rows are un-permuted,
    so the result loads into transformers' LlamaForCausalLM and generates the same text as llama.cpp.
    """
    config = read_llama_config(reader)
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_weight_name(tensor.name)
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = weight.reshape(expected)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))
    return state_dict


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":
        # llama.cpp's smollm pre-tokenizer: every digit on its own, then the GPT-2 split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ModelLoadError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported (gpt2, default, smollm)")


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary, merges and token types.

    Control tokens become added special tokens and user-defined tokens added (non-special) tokens, with the
    ids they have in the GGUF. No BOS/EOS is added on encode (llama.cpp's add_bos_token is false for gpt2).
    """
    tokenizer_model = _field(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer.ggml.model {tokenizer_model!r} is not supported (only 'gpt2')")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(token, special=kind == _TOKEN_TYPE_CONTROL, normalized=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    return tokenizer


def add_special_tokens(tokenizer: Tokenizer, contents: Sequence[str]) -> list[int]:
    """Append `contents` as added special tokens (not normalized, not stripped); returns their ids."""
    tokenizer.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in contents])
    ids = [tokenizer.token_to_id(c) for c in contents]
    if any(i is None for i in ids):
        raise ModelLoadError(f"could not add special tokens {list(contents)}")
    return [int(i) for i in ids]


def _token(reader: GGUFReader, key: str) -> str | None:
    token_id = _optional_int(reader, key)
    return None if token_id is None else _field(reader, "tokenizer.ggml.tokens")[token_id]


def write_tokenizer_files(
    reader: GGUFReader, out_dir: Path, *, extra_special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json.

    The files load with transformers' PreTrainedTokenizerFast (no remote code); tokenizer_config.json carries
    the GGUF's chat template. `extra_special_tokens` (e.g. image tokens) are appended as added special tokens.
    generation_config.json lists the stop ids: the EOS token and `<|im_end|>` where the vocabulary has it.
    Returns the tokenizer written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(reader)
    if extra_special_tokens:
        add_special_tokens(tokenizer, extra_special_tokens)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        "bos_token": _token(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token": _token(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token": _token(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token": _token(reader, "tokenizer.ggml.unknown_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    if extra_special_tokens:
        special["additional_special_tokens"] = list(extra_special_tokens)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "generation_config.json", _generation_config(reader, tokenizer))
    return tokenizer


def _generation_config(reader: GGUFReader, tokenizer: Tokenizer) -> dict[str, Any]:
    eos_ids = [int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in eos_ids:
        eos_ids.append(im_end)
    config: dict[str, Any] = {"bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id"))}
    config["eos_token_id"] = eos_ids
    pad_id = _optional_int(reader, "tokenizer.ggml.padding_token_id")
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
