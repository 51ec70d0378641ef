"""Fixtures for inputs/ tests: the tiny tokenizer and a processor on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tests.unit.inputs.helpers import NEMOTRON_CONFIG, write_tiny_tokenizer
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture()
def processor(tiny_tokenizer: PreTrainedTokenizerFast) -> NemotronVLProcessor:
    return NemotronVLProcessor(NEMOTRON_CONFIG, tiny_tokenizer, max_tiles=12)
