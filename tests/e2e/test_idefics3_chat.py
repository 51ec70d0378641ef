"""A tiny random SmolVLM (Idefics3) checkpoint served by `vlmserve serve`, asked about an image through the
official `openai` SDK: the second model family goes through the same HTTP, input and engine code."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.e2e.conftest import RunningServer, start_server, stop_server, wait_ready

SERVED_NAME = "HuggingFaceTB/SmolVLM-256M-Instruct"


@pytest.fixture(scope="module")
def smolvlm_server(tiny_smolvlm_checkpoint_dir: Path, tmp_path_factory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("smolvlm-server") / "server.log"
    running = start_server(
        [
            "--model",
            str(tiny_smolvlm_checkpoint_dir),
            "--served-model-name",
            SERVED_NAME,
            "--dtype",
            "float32",
            "--max-tiles",
            "16",
        ],
        log_path,
    )
    try:
        wait_ready(running)
        yield running
    finally:
        stop_server(running)


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_image_through_openai_sdk(smolvlm_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=smolvlm_server.base_url + "/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(300, 120)}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_tokens=5,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert response.usage is not None
    # 300x120 -> 256x102 -> 256x128: 2 x 4 sub-images + the global one, 4 <image> tokens and 2 tags each
    assert response.usage.prompt_tokens > 9 * (4 + 2)
    assert 1 <= response.usage.completion_tokens <= 5


def test_streamed_chat_with_image(smolvlm_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=smolvlm_server.base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": png_data_url(64, 64)}},
                ],
            }
        ],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    finish_reasons = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
    assert finish_reasons[-1] in ("length", "stop")
