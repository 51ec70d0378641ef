"""The built-in demo model: what it contains, and how ensure_default_model builds, reuses and rebuilds it.

The real build runs once per session (about 15 s); the reuse/rebuild/locking tests swap the build step
for a stub so they test the folder handling alone.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmserve.errors import ModelLoadError
from vlmserve.models import default_model
from vlmserve.models.config import parse_nemotron_vl_config
from vlmserve.models.default_model import (
    DEFAULT_MODEL_DESCRIPTION,
    DEFAULT_SERVED_MODEL_NAME,
    DEMO_WEIGHTS_PATH,
    IMAGE_EMBEDDING_KEY,
    IMAGE_TOKENS,
    MANIFEST_NAME,
    RECIPE_VERSION,
    ensure_default_model,
)


@pytest.fixture(scope="session")
def built_default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("vlmserve-cache"))


@pytest.fixture(scope="module")
def shipped() -> dict[str, torch.Tensor]:
    return load_file(str(DEMO_WEIGHTS_PATH))


@pytest.fixture(scope="module")
def config(built_default_model: Path) -> dict[str, Any]:
    return json.loads((built_default_model / "config.json").read_text())


@pytest.fixture(scope="module")
def weights(built_default_model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(built_default_model / "model.safetensors"))


def test_folder_name_and_files(built_default_model: Path) -> None:
    assert built_default_model.name == f"default-{RECIPE_VERSION}"
    names = {p.name for p in built_default_model.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        MANIFEST_NAME,
    } <= names
    assert not list(built_default_model.parent.glob(".*.tmp"))


def test_manifest(built_default_model: Path) -> None:
    manifest = json.loads((built_default_model / MANIFEST_NAME).read_text())
    assert manifest["recipe_version"] == RECIPE_VERSION and manifest["vision"] == "trained"
    assert manifest["vision_sha256"] == hashlib.sha256(DEMO_WEIGHTS_PATH.read_bytes()).hexdigest()
    assert len(manifest["gguf_sha256"]) == 64


def test_config_follows_the_contract(config: dict[str, Any]) -> None:
    parsed = parse_nemotron_vl_config(config)
    assert config["architectures"] == ["Llama_Nemotron_Nano_VL"]
    assert (parsed.force_image_size, parsed.patch_size, parsed.downsample_ratio) == (256, 32, 0.5)
    assert (parsed.ps_version, parsed.use_thumbnail, parsed.max_dynamic_patch) == ("v2", True, 1)
    assert (parsed.vit_hidden_size, parsed.projector_hidden_size, parsed.tokens_per_tile) == (192, 576, 16)
    vision = parsed.vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (192, 6, 3)
    assert (vision.intermediate_size, vision.max_grid_size, vision.num_summary_tokens) == (768, 8, 8)
    llm = parsed.llm
    assert (llm.hidden_size, llm.num_hidden_layers, llm.vocab_size, llm.tie_word_embeddings) == (
        576,
        30,
        49155,
        True,
    )
    assert config["max_sequence_length"] == 8192 and config["torch_dtype"] == "bfloat16"


def test_weights_are_bf16_with_trained_image_token_rows(
    weights: dict[str, torch.Tensor], shipped: dict[str, torch.Tensor]
) -> None:
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    embed = weights["language_model.model.embed_tokens.weight"]
    assert embed.shape == (49155, 576)
    # <img> and </img> were trained with the vision half; <image> is always replaced by image features
    assert torch.equal(embed[49152:49154], shipped[IMAGE_EMBEDDING_KEY].to(torch.bfloat16))
    mean = embed[:49152].float().mean(dim=0)
    torch.testing.assert_close(embed[49154].float(), mean, atol=1e-2, rtol=0)
    assert "language_model.lm_head.weight" not in weights
    assert weights["vision_model.radio_model.model.patch_generator.pos_embed"].shape == (1, 8 * 8, 192)
    assert weights["mlp1.1.weight"].shape == (576, 768)


def test_vision_weights_are_the_shipped_ones(
    weights: dict[str, torch.Tensor], shipped: dict[str, torch.Tensor]
) -> None:
    vision = {name for name in weights if not name.startswith("language_model.")}
    assert vision == set(shipped) - {IMAGE_EMBEDDING_KEY}
    for name in vision:
        assert torch.equal(weights[name], shipped[name].to(torch.bfloat16)), name


def test_tokenizer_has_image_tokens(built_default_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built_default_model))
    assert [tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS] == [49152, 49153, 49154]
    assert len(tokenizer) == 49155
    assert "<|im_start|>" in tokenizer.chat_template


def test_language_half_answers_paris(
    built_default_model: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(built_default_model))
    prefix = "language_model."
    lm_weights = {k[len(prefix) :]: v.float() for k, v in weights.items() if k.startswith(prefix)}
    model = LlamaForCausalLM(LlamaConfig(**config["llm_config"])).eval()
    model.load_state_dict(lm_weights, strict=False)
    model.tie_weights()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_second_call_reuses_the_folder(built_default_model: Path) -> None:
    mtime = (built_default_model / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert ensure_default_model(built_default_model.parent) == built_default_model
    assert time.monotonic() - start < 1.0
    assert (built_default_model / "model.safetensors").stat().st_mtime_ns == mtime


def test_names_for_the_start_log() -> None:
    assert DEFAULT_SERVED_MODEL_NAME.startswith("vlmserve/")
    assert "demo" in DEFAULT_SERVED_MODEL_NAME
    assert "SmolLM2-135M-Instruct" in DEFAULT_MODEL_DESCRIPTION and "synthetic" in DEFAULT_MODEL_DESCRIPTION


class _StubBuild:
    """Stands in for build_default_model: writes a manifest-only folder and counts the calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, out_dir: Path, *, vision_weights: Path | None, seed: int = 0) -> None:
        self.calls += 1
        assert not out_dir.exists()
        out_dir.mkdir()
        time.sleep(self.delay)
        digest = hashlib.sha256(vision_weights.read_bytes()).hexdigest() if vision_weights else None
        manifest = {"recipe_version": RECIPE_VERSION, "vision_sha256": digest}
        (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """A stand-in weights file for the folder-handling tests (the stub build only hashes it)."""
    path = tmp_path / "weights" / "vision.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"weights v1")
    return path


def test_leftover_temp_folder_is_removed_and_rebuilt(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(default_model, "build_default_model", stub)
    leftover = tmp_path / f".default-{RECIPE_VERSION}.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    path = ensure_default_model(tmp_path, vision_weights=weights_file)
    assert stub.calls == 1 and not leftover.exists()
    assert (path / MANIFEST_NAME).is_file() and not (path / "model.safetensors").exists()


def test_folder_without_manifest_is_rebuilt(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(default_model, "build_default_model", stub)
    partial = tmp_path / f"default-{RECIPE_VERSION}"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    assert ensure_default_model(tmp_path, vision_weights=weights_file) == partial
    assert stub.calls == 1 and not (partial / "config.json").exists()
    ensure_default_model(tmp_path, vision_weights=weights_file)
    assert stub.calls == 1


def test_new_weights_file_rebuilds(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(default_model, "build_default_model", stub)
    first = ensure_default_model(tmp_path, vision_weights=weights_file)
    weights_file.write_bytes(b"weights v2")
    assert ensure_default_model(tmp_path, vision_weights=weights_file) == first
    assert stub.calls == 2


def test_concurrent_builders_build_once(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = _StubBuild(delay=0.3)
    monkeypatch.setattr(default_model, "build_default_model", stub)
    results: list[Path] = []

    def build() -> None:
        results.append(ensure_default_model(tmp_path, vision_weights=weights_file))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stub.calls == 1 and len(set(results)) == 1 and len(results) == 4


def test_failed_build_leaves_nothing(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_build(out_dir: Path, *, vision_weights: Path | None, seed: int = 0) -> None:
        out_dir.mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "build_default_model", broken_build)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model(cache, vision_weights=weights_file)
    assert not any(p.is_dir() for p in cache.iterdir())


def test_missing_weights_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(ModelLoadError, match=str(missing)):
        ensure_default_model(tmp_path / "cache", vision_weights=missing)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _real_build_fails(tmp_path: Path, weights: Path) -> str:
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        ensure_default_model(cache, vision_weights=weights)
    # real build, real failure: nothing half-written is left for the next start to trust
    assert not any(p.is_dir() for p in cache.iterdir())
    return str(info.value)


def test_corrupt_weights_file_names_it(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(DEMO_WEIGHTS_PATH.read_bytes()[:5000])
    message = _real_build_fails(tmp_path, corrupt)
    assert str(corrupt) in message and "corrupt" in message


def test_weights_of_another_recipe_are_refused(tmp_path: Path, shipped: dict[str, torch.Tensor]) -> None:
    other = tmp_path / "other.safetensors"
    tensors = dict(shipped)
    del tensors["mlp1.3.bias"]
    tensors["mlp1.1.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(other))
    message = _real_build_fails(tmp_path, other)
    assert str(other) in message and "mlp1.3.bias" in message and "mlp1.1.weight" in message
