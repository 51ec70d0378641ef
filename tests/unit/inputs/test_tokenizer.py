from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.unit.inputs.helpers import write_tiny_tokenizer
from vlmserve.errors import ModelLoadError
from vlmserve.inputs.tokenizer import eos_token_ids, load_tokenizer


def test_loads_tokenizer_with_template_from_config(tiny_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.chat_template and "start_header_id" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id


def test_template_from_jinja_file(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "t", template_in_config=False))
    assert tokenizer.chat_template and "start_header_id" in tokenizer.chat_template


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_is_named(tiny_tokenizer_dir: Path, tmp_path: Path, missing: str) -> None:
    copy = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "copy"))
    (copy / missing).unlink()
    with pytest.raises(ModelLoadError, match=re.escape(missing)):
        load_tokenizer(copy)


def test_missing_template_is_named(tmp_path: Path) -> None:
    out = write_tiny_tokenizer(tmp_path / "t", template_in_config=False)
    (out / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="chat_template"):
        load_tokenizer(out)


def test_eos_ids_from_every_source(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "copy"))
    tokenizer = load_tokenizer(copy)
    assert eos_token_ids(copy, tokenizer) == {tokenizer.eos_token_id}
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (copy / "config.json").write_text(json.dumps({"llm_config": {"eos_token_id": 9}}))
    assert eos_token_ids(copy, tokenizer) == {tokenizer.eos_token_id, 7, 8, 9}
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert eos_token_ids(copy, tokenizer) == {tokenizer.eos_token_id, 9, 11}


def test_bad_eos_value_is_named(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / "copy"))
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ModelLoadError, match=r"generation_config\.json"):
        eos_token_ids(copy, load_tokenizer(copy))
