"""The built-in default model: what it contains, and how ensure_default_model builds, reuses and rebuilds it.

The real build runs once per session (about 15 s); the reuse/rebuild/locking tests swap the build step
for a stub so they test the folder handling alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vlmserve.models import default_model
from vlmserve.models.config import parse_nemotron_vl_config
from vlmserve.models.default_model import (
    DEFAULT_MODEL_DESCRIPTION,
    DEFAULT_SERVED_MODEL_NAME,
    IMAGE_TOKENS,
    MANIFEST_NAME,
    RECIPE_VERSION,
    ensure_default_model,
)
from vlmserve.models.random_init import random_state_dict


@pytest.fixture(scope="session")
def built_default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("vlmserve-cache"), seed=0)


@pytest.fixture(scope="module")
def config(built_default_model: Path) -> dict[str, Any]:
    return json.loads((built_default_model / "config.json").read_text())


@pytest.fixture(scope="module")
def weights(built_default_model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(built_default_model / "model.safetensors"))


def test_folder_name_and_files(built_default_model: Path) -> None:
    assert built_default_model.name == f"default-{RECIPE_VERSION}"
    names = {p.name for p in built_default_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", MANIFEST_NAME} <= names
    assert not list(built_default_model.parent.glob(".*.tmp"))


def test_manifest(built_default_model: Path) -> None:
    manifest = json.loads((built_default_model / MANIFEST_NAME).read_text())
    assert manifest["recipe_version"] == RECIPE_VERSION
    assert manifest["seed"] == 0 and manifest["vision"] == "untrained"
    assert len(manifest["gguf_sha256"]) == 64


def test_config_follows_the_contract(config: dict[str, Any]) -> None:
    parsed = parse_nemotron_vl_config(config)
    assert config["architectures"] == ["Llama_Nemotron_Nano_VL"]
    assert (parsed.force_image_size, parsed.patch_size, parsed.downsample_ratio) == (512, 16, 0.5)
    assert (parsed.ps_version, parsed.use_thumbnail, parsed.max_dynamic_patch) == ("v2", True, 12)
    assert (parsed.vit_hidden_size, parsed.projector_hidden_size, parsed.tokens_per_tile) == (256, 576, 256)
    vision = parsed.vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (256, 4, 4)
    assert (vision.intermediate_size, vision.max_grid_size, vision.num_summary_tokens) == (1024, 128, 8)
    llm = parsed.llm
    assert (llm.hidden_size, llm.num_hidden_layers, llm.vocab_size, llm.tie_word_embeddings) == (
        576, 30, 49155, True)
    assert config["max_sequence_length"] == 8192 and config["torch_dtype"] == "bfloat16"


def test_weights_are_bf16_with_grown_embedding(weights: dict[str, torch.Tensor]) -> None:
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    embed = weights["language_model.model.embed_tokens.weight"]
    assert embed.shape == (49155, 576)
    mean = embed[:49152].float().mean(dim=0)
    torch.testing.assert_close(embed[49152:].float(), mean.expand(3, -1), atol=1e-2, rtol=0)
    assert "language_model.lm_head.weight" not in weights
    assert weights["vision_model.radio_model.model.patch_generator.pos_embed"].shape == (1, 128 * 128, 256)
    assert weights["mlp1.1.weight"].shape == (576, 1024)


def test_vision_weights_come_from_the_seed(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    expected = random_state_dict(config, seed=0, include_language_model=False)
    assert set(expected) == {name for name in weights if not name.startswith("language_model.")}
    name = "vision_model.radio_model.model.blocks.3.attn.qkv.weight"
    assert torch.equal(weights[name], expected[name].to(torch.bfloat16))


def test_tokenizer_has_image_tokens(built_default_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built_default_model))
    assert [tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS] == [49152, 49153, 49154]
    assert len(tokenizer) == 49155
    assert "<|im_start|>" in tokenizer.chat_template


def test_language_half_answers_paris(built_default_model: Path, config: dict[str, Any],
                                     weights: dict[str, torch.Tensor]) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(built_default_model))
    prefix = "language_model."
    lm_weights = {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}
    model = LlamaForCausalLM(LlamaConfig(**config["llm_config"])).eval()
    model.load_state_dict(lm_weights, strict=False)
    model.tie_weights()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_second_call_reuses_the_folder(built_default_model: Path) -> None:
    mtime = (built_default_model / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert ensure_default_model(built_default_model.parent, seed=0) == built_default_model
    assert time.monotonic() - start < 1.0
    assert (built_default_model / "model.safetensors").stat().st_mtime_ns == mtime


def test_names_for_the_start_log() -> None:
    assert DEFAULT_SERVED_MODEL_NAME.startswith("vlmserve/")
    assert "SmolLM2-135M-Instruct" in DEFAULT_MODEL_DESCRIPTION and "untrained" in DEFAULT_MODEL_DESCRIPTION


class _StubBuild:
    """Stands in for build_default_model: writes a manifest-only folder and counts the calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, out_dir: Path, *, seed: int = 0) -> None:
        self.calls += 1
        assert not out_dir.exists()
        out_dir.mkdir()
        time.sleep(self.delay)
        manifest = {"recipe_version": RECIPE_VERSION, "seed": seed}
        (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_leftover_temp_folder_is_removed_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(default_model, "build_default_model", stub)
    leftover = tmp_path / f".default-{RECIPE_VERSION}.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    path = ensure_default_model(tmp_path)
    assert stub.calls == 1 and not leftover.exists()
    assert (path / MANIFEST_NAME).is_file() and not (path / "model.safetensors").exists()


def test_folder_without_manifest_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(default_model, "build_default_model", stub)
    partial = tmp_path / f"default-{RECIPE_VERSION}"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    assert ensure_default_model(tmp_path) == partial
    assert stub.calls == 1 and not (partial / "config.json").exists()
    ensure_default_model(tmp_path)
    assert stub.calls == 1


def test_other_seed_gets_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "build_default_model", _StubBuild())
    assert ensure_default_model(tmp_path, seed=7).name == f"default-{RECIPE_VERSION}-seed7"


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubBuild(delay=0.3)
    monkeypatch.setattr(default_model, "build_default_model", stub)
    results: list[Path] = []
    def build() -> None:
        results.append(ensure_default_model(tmp_path))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stub.calls == 1 and len(set(results)) == 1 and len(results) == 4


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(out_dir: Path, *, seed: int = 0) -> None:
        out_dir.mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "build_default_model", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model(tmp_path)
    assert not any(p.is_dir() for p in tmp_path.iterdir())
