"""Write a checkpoint directory in the layout of docs/CHECKPOINT.md.

Owns config.json, the safetensors files (one, or shards with model.safetensors.index.json) and
copying the tokenizer files beside them. Used by the default-model builder and test checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmserve.models.loader import INDEX_FILE, SINGLE_FILE

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def split_into_shards(
    state_dict: dict[str, torch.Tensor], max_shard_bytes: int | None
) -> list[dict[str, torch.Tensor]]:
    """Split in name order into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    if max_shard_bytes is None:
        return [state_dict]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_checkpoint(
    out_dir: Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    tokenizer_dir: Path | None,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json, the weights (cast to `dtype` when given; sharded when they exceed
    `max_shard_bytes`) and the tokenizer files present in `tokenizer_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        name: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous()
        for name, t in state_dict.items()
    }
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    else:
        _write_shards(out_dir, shards)
    if tokenizer_dir is not None:
        for file_name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / file_name
            if source.is_file():
                shutil.copyfile(source, out_dir / file_name)


def _write_shards(out_dir: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
