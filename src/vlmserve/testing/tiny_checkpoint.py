"""Tiny random Llama_Nemotron_Nano_VL checkpoints for tests (docs/CHECKPOINT.md layout, real names).

Owns the tiny config and writing it with random weights through the real checkpoint writer, sharded
with an index, so tests exercise the real loader. Sizes: LM hidden 64, 2 layers, 4 heads, 2 kv heads;
RADIO hidden 32, 2 blocks; 64x64 tiles of 16x16 patches -> 4 tokens per tile.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from vlmserve.models.checkpoint_writer import split_into_shards, write_checkpoint
from vlmserve.models.random_init import random_state_dict


def tiny_nemotron_vl_config(
    vocab_size: int,
    *,
    tile_size: int = 64,
    patch_size: int = 16,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A config.json dict of the real architecture at test size."""
    return {
        "architectures": ["Llama_Nemotron_Nano_VL"],
        "model_type": "Llama_Nemotron_Nano_VL",
        "force_image_size": tile_size,
        "patch_size": patch_size,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "vit_hidden_size": 32,
        "projector_hidden_size": 96,
        "torch_dtype": "float32",
        "llm_config": {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "max_position_embeddings": 4096,
            "vocab_size": vocab_size,
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        },
        "vision_config": {
            "model_type": "radio",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "patch_size": patch_size,
            "max_img_size": 4 * tile_size,
            "num_cls_tokens": 2,
            "num_registers": 2,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "norm_mean": [0.48145466, 0.4578275, 0.40821073],
            "norm_std": [0.26862954, 0.26130258, 0.27577711],
        },
    }


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested dicts (llm_config, vision_config) are updated key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _special_token_ids(tokenizer_dir: Path, tokenizer: Tokenizer) -> tuple[int | None, int | None]:
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def token_id(key: str) -> int | None:
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return tokenizer.token_to_id(token) if isinstance(token, str) else None

    return token_id("bos_token"), token_id("eos_token")


def _shard_limit(state_dict: dict[str, Any], num_shards: int) -> int | None:
    """The smallest max_shard_bytes giving at most `num_shards` shards (None: one file)."""
    if num_shards <= 1:
        return None
    low, high = 1, sum(t.numel() * t.element_size() for t in state_dict.values())
    while low < high:
        mid = (low + high) // 2
        if len(split_into_shards(state_dict, mid)) <= num_shards:
            high = mid
        else:
            low = mid + 1
    return low


def write_tiny_checkpoint(
    out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, num_shards: int = 2, **overrides: Any
) -> Path:
    """Write a tiny random checkpoint whose vocab is the tokenizer's length; returns `out_dir`.

    `overrides` update config.json keys (nested dicts merged), e.g.
    `llm_config={"tie_word_embeddings": True}`.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos_id, eos_id = _special_token_ids(tokenizer_dir, tokenizer)
    config = tiny_nemotron_vl_config(
        tokenizer.get_vocab_size(with_added_tokens=True), bos_token_id=bos_id, eos_token_id=eos_id
    )
    config = _merge(config, overrides)
    state_dict = random_state_dict(config, seed=seed)
    write_checkpoint(
        Path(out_dir),
        config,
        state_dict,
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=_shard_limit(state_dict, num_shards),
    )
    return Path(out_dir)
