"""image_spans: each request image's token span in a prepared prompt, for both processors' layouts
(one ImageInput per image in both families; Idefics3's span holds grid markers between its runs),
adjacent images included. The spans and the text between them must account for every prompt id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import data_url, png_bytes
from tests.unit.inputs.helpers import write_tiny_tokenizer
from vlmserve.config import ServerConfig
from vlmserve.inputs.idefics3 import Idefics3Processor
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.preprocess import InputPreprocessor, PreparedPrompt
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart
from vlmserve.server.serving_tokenize import _IMAGE_SENTINEL, image_spans
from vlmserve.testing.smolvlm_checkpoint import smolvlm_256m_config, smolvlm_preprocessor_config

NEMOTRON_TILE_CONFIG = {
    "force_image_size": 64,
    "patch_size": 16,
    "downsample_ratio": 0.5,
    "use_thumbnail": True,
}


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer")))


def _refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be fetched, got {request.url}")


def _preprocessor(tokenizer: Any, processor: Any) -> InputPreprocessor:
    client = httpx.AsyncClient(transport=httpx.MockTransport(_refuse))
    return InputPreprocessor(tokenizer, processor, ServerConfig(max_tiles=6), client=client)


def _messages(*, adjacent: bool) -> list[ChatMessage]:
    wide = ImagePart(url=data_url(png_bytes(1200, 500)), detail="high")
    small = ImagePart(url=data_url(png_bytes(40, 40)), detail="low")
    parts: list[TextPart | ImagePart] = [wide, small] if adjacent else [wide, TextPart(text="and"), small]
    return [ChatMessage(role="user", content=[*parts, TextPart(text="What differs?")])]


def _check_spans(tokenizer: Any, prompt: Any, expected_tiles: list[int]) -> None:
    spans = image_spans(prompt, tokenizer)
    assert spans is not None
    assert [span.num_tiles for span in spans] == expected_tiles
    ids = prompt.prompt_token_ids
    pieces = _IMAGE_SENTINEL.split(prompt.prompt_text)
    rebuilt: list[int] = []
    for piece, span in zip(pieces, [*spans, None], strict=True):
        rebuilt += tokenizer.encode(piece, add_special_tokens=False) if piece else []
        if span is not None:
            assert len(rebuilt) == span.start
            rebuilt += ids[span.start : span.end]
            # every image-context token of the image lies inside its span
            inside = [image for image in prompt.images if span.start <= image.offset < span.end]
            assert sum(image.num_tiles for image in inside) == span.num_tiles
            assert all(image.offset + image.length <= span.end for image in inside)
    assert rebuilt == ids


@pytest.mark.parametrize("adjacent", [False, True])
async def test_idefics3_spans(smolvlm_tokenizer_dir: Path, adjacent: bool) -> None:
    tokenizer = load_tokenizer(smolvlm_tokenizer_dir)
    processor = Idefics3Processor(
        smolvlm_256m_config(), tokenizer, max_tiles=6, image_config=smolvlm_preprocessor_config()
    )
    preprocessor = _preprocessor(tokenizer, processor)
    try:
        prompt = await preprocessor.prepare(_messages(adjacent=adjacent), completion_mode=False)
    finally:
        await preprocessor.aclose()
    cols, rows = processor.grid(1200, 500, max_tiles=6)[:2]
    _check_spans(tokenizer, prompt, [cols * rows + 1, 1])


@pytest.mark.parametrize("adjacent", [False, True])
async def test_nemotron_spans(tiny_tokenizer: Any, adjacent: bool) -> None:
    processor = NemotronVLProcessor(NEMOTRON_TILE_CONFIG, tiny_tokenizer, max_tiles=6)
    preprocessor = _preprocessor(tiny_tokenizer, processor)
    try:
        prompt = await preprocessor.prepare(_messages(adjacent=adjacent), completion_mode=False)
    finally:
        await preprocessor.aclose()
    _check_spans(tiny_tokenizer, prompt, [processor.num_tiles(1200, 500, max_tiles=6), 1])
    spans = image_spans(prompt, tiny_tokenizer)
    assert spans is not None
    assert [span.end - span.start for span in spans] == [2 + 4 * span.num_tiles for span in spans]


def test_spans_give_up_on_an_unknown_layout(tiny_tokenizer: Any) -> None:
    prompt = PreparedPrompt(prompt_token_ids=[1, 2, 3], images=[], prompt_text="<|vlmserve-image-00|>x")
    assert image_spans(prompt, tiny_tokenizer) is None
