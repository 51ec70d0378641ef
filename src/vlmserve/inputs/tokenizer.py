"""Load a checkpoint's tokenizer and its stop ids, without AutoTokenizer or remote code.

The tokenizer is transformers' `PreTrainedTokenizerFast` built from `tokenizer.json` and
`tokenizer_config.json`; the chat template comes from `tokenizer_config.json`, `chat_template.jinja`
or `chat_template.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from vlmserve.errors import ModelLoadError

_REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer of `model_dir`, with its chat template.

    Raises ModelLoadError naming the missing or unreadable file, or when no chat template is found.
    """
    model_dir = Path(model_dir)
    for name in _REQUIRED_FILES:
        if not (model_dir / name).is_file():
            needed = " and ".join(_REQUIRED_FILES)
            raise ModelLoadError(f"{model_dir / name}: missing (the tokenizer needs {needed})")
    try:
        # The concrete class never runs code from the checkpoint; local_files_only keeps it offline.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{model_dir / 'tokenizer.json'}: cannot be loaded: {e}") from e
    if not tokenizer.chat_template:
        tokenizer.chat_template = _read_template_file(model_dir)
    return tokenizer


def _read_template_file(model_dir: Path) -> str:
    """chat_template.jinja, or chat_template.json's "chat_template" (where processors keep it)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, str) and template:
        return template
    raise ModelLoadError(
        f"{model_dir / 'tokenizer_config.json'}: no chat_template, and neither {path.name} "
        "nor chat_template.json holds one"
    )


def eos_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Every token id that ends generation: the tokenizer's eos, generation_config.json's eos_token_id
    (int or list) and config.json's eos_token_id (top level and in llm_config). Missing files are skipped."""
    model_dir = Path(model_dir)
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = _read_json(model_dir / "generation_config.json")
    ids |= _as_ids(generation_config.get("eos_token_id"), "generation_config.json")
    config = _read_json(model_dir / "config.json")
    ids |= _as_ids(config.get("eos_token_id"), "config.json")
    llm_config = config.get("llm_config")
    if isinstance(llm_config, dict):
        ids |= _as_ids(llm_config.get("eos_token_id"), "config.json llm_config")
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any, where: str) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return set(value)
    raise ModelLoadError(f"{where}: eos_token_id must be an int or a list of ints, got {value!r}")
