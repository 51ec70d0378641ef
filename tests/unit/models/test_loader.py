"""Checkpoint loading: config.json parsing, the registry, the safetensors loader and its errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmserve.errors import ModelLoadError
from vlmserve.models.checkpoint_writer import write_checkpoint
from vlmserve.models.config import parse_nemotron_vl_config
from vlmserve.models.loader import load_weights
from vlmserve.models.nemotron_vl import NemotronVLForConditionalGeneration
from vlmserve.models.random_init import random_state_dict
from vlmserve.models.registry import ARCHITECTURES, build_empty_model, load_model
from vlmserve.testing.tiny_checkpoint import tiny_nemotron_vl_config

CPU = torch.device("cpu")
VOCAB = 256
SHARD_BYTES = 400_000  # splits the small checkpoint below into a few shards


def small_checkpoint(
    out_dir: Path,
    *,
    drop: str | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    **llm_overrides: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A sharded tiny checkpoint without tokenizer; `drop` leaves one tensor out, `extra` adds tensors."""
    config = tiny_nemotron_vl_config(VOCAB)
    config["llm_config"].update(llm_overrides)
    state = random_state_dict(config, seed=0)
    written = {n: t for n, t in state.items() if n != drop} | (extra or {})
    write_checkpoint(out_dir, config, written, tokenizer_dir=None, max_shard_bytes=SHARD_BYTES)
    return config, state


@torch.no_grad()
def run_model(model: NemotronVLForConditionalGeneration, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image features and text logits of a fixed input, concatenated: [12 + 4 * vocab]."""
    pixel_values = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    features = model.embed_images(pixel_values)
    cache = model.make_kv_cache(8, dtype=dtype, device="cpu")
    hidden = model(model.embed_tokens(torch.tensor([1, 2, 3, 4])), torch.arange(4), cache)
    return torch.cat([features.float().flatten(), model.compute_logits(hidden).flatten()])


def reference_model(
    config: dict[str, Any], state: dict[str, torch.Tensor]
) -> NemotronVLForConditionalGeneration:
    model = NemotronVLForConditionalGeneration(parse_nemotron_vl_config(config))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------- round trips


def test_tiny_checkpoint_fixture_loads(tiny_checkpoint_dir: Path) -> None:
    files = sorted(p.name for p in tiny_checkpoint_dir.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) == 2
    loaded = load_model(tiny_checkpoint_dir, dtype=torch.float32, device=CPU, progress=False)
    vocab = loaded.config.llm.vocab_size
    assert loaded.model.compute_logits(torch.zeros(1, 64)).shape == (1, vocab)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sharded_round_trip_gives_identical_outputs(tmp_path: Path, tie: bool) -> None:
    config, state = small_checkpoint(tmp_path, tie_word_embeddings=tie)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)
    assert loaded.family is ARCHITECTURES["Llama_Nemotron_Nano_VL"]
    assert loaded.raw_config == config
    assert torch.equal(run_model(loaded.model), run_model(reference_model(config, state)))


def test_bfloat16_load(tmp_path: Path) -> None:
    config, state = small_checkpoint(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device=CPU, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in loaded.model.state_dict().values())
    reference = run_model(reference_model(config, state))
    assert (run_model(loaded.model, torch.bfloat16) - reference).abs().max() < 0.1 * reference.abs().max()


def test_single_file_checkpoint_and_ignored_tensors(tmp_path: Path) -> None:
    """summary_idxs and a tied lm_head are skipped; input-conditioner buffers may be absent."""
    config = tiny_nemotron_vl_config(VOCAB, tie_word_embeddings=True)
    state = random_state_dict(config, seed=1)
    written = {n: t for n, t in state.items() if "input_conditioner" not in n}
    written["vision_model.radio_model.summary_idxs"] = torch.tensor([0, 1])
    written["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, config, written, tokenizer_dir=None)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)
    assert torch.equal(run_model(loaded.model), run_model(reference_model(config, state)))


def test_radio_args_config_form(tmp_path: Path) -> None:
    """The Hub's remote-code vision_config: sizes from the timm name, summary count from cls_token.token."""
    plain = tiny_nemotron_vl_config(VOCAB, tile_size=32)
    plain["vit_hidden_size"] = 192
    plain["vision_config"].update(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        max_img_size=128,
        num_cls_tokens=3,
        num_registers=5,
    )
    state = random_state_dict(plain, seed=0)
    state["vision_model.radio_model.input_conditioner.norm_mean"] = torch.tensor([0.1, 0.2, 0.3]).view(
        3, 1, 1
    )
    hub = dict(
        plain,
        vision_config={
            "model_type": "radio",
            "max_resolution": 128,
            "patch_size": 16,
            "args": {"model": "vit_tiny_patch16_224", "cpe_max_size": 128},
        },
    )
    write_checkpoint(tmp_path, hub, state, tokenizer_dir=None)
    loaded = load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)
    vision = loaded.config.vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (192, 12, 3)
    assert vision.num_summary_tokens == 8 and vision.max_img_size == 128
    conditioner = loaded.model.vision_model.radio_model.input_conditioner
    assert torch.equal(conditioner.norm_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_meta_construction_does_not_allocate() -> None:
    """The 8B configuration builds in no time on the meta device, and build_empty_model casts before
    allocating (a tiny model ends up with every tensor in bf16 on the CPU)."""
    real = tiny_nemotron_vl_config(128256, tile_size=512)
    real["llm_config"].update(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    real["vision_config"].update(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=16,
        intermediate_size=5120,
        max_img_size=2048,
    )
    real.update(vit_hidden_size=1280, projector_hidden_size=4096)
    started = time.perf_counter()
    with torch.device("meta"):
        model = NemotronVLForConditionalGeneration(parse_nemotron_vl_config(real))
    assert time.perf_counter() - started < 5
    assert all(t.is_meta for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) > 8e9
    tiny = build_empty_model(
        NemotronVLForConditionalGeneration,
        parse_nemotron_vl_config(tiny_nemotron_vl_config(VOCAB)),
        dtype=torch.bfloat16,
        device=CPU,
    )
    assert all(t.dtype == torch.bfloat16 and t.device == CPU for t in tiny.state_dict().values())


# ---------------------------------------------------------------- errors


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    small_checkpoint(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_no_weights_at_all(tmp_path: Path) -> None:
    small_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


@pytest.mark.parametrize("damage", ["garbage-header", "truncated"])
def test_corrupt_shard_names_the_file(tmp_path: Path, damage: str) -> None:
    small_checkpoint(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 64 + data[64:] if damage == "garbage-header" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    small_checkpoint(tmp_path, drop=name)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    small_checkpoint(tmp_path, extra={"language_model.model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match=r"mlp\.extra\.weight"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_wrong_shape_names_tensor_and_file(tmp_path: Path) -> None:
    name = "mlp1.1.weight"
    small_checkpoint(tmp_path, extra={name: torch.zeros(3, 3)})
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][name]
    with pytest.raises(ModelLoadError, match=rf"{shard}.*mlp1\.1\.weight.*\[3, 3\]"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_load_weights_into_existing_model_reports_missing(tmp_path: Path) -> None:
    config, _ = small_checkpoint(tmp_path, drop="mlp1.0.bias")
    model = NemotronVLForConditionalGeneration(parse_nemotron_vl_config(config))
    with pytest.raises(ModelLoadError, match=r"mlp1\.0\.bias"):
        load_weights(model, tmp_path, progress=False)


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    small_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="Llama_Nemotron_Nano_VL"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, progress=False)


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda c: c["llm_config"].pop("hidden_size"), "llm_config.hidden_size"),
        (lambda c: c["vision_config"].pop("max_img_size"), "vision_config.max_img_size"),
        (lambda c: c.pop("force_image_size"), "force_image_size"),
        (lambda c: c["llm_config"].update(num_attention_heads="32"), "llm_config.num_attention_heads"),
        (lambda c: c["llm_config"]["rope_scaling"].update(rope_type="yarn"), "llm_config.rope_scaling"),
        (lambda c: c["llm_config"]["rope_scaling"].pop("factor"), "llm_config.rope_scaling.factor"),
        (lambda c: c.update(ps_version="v3"), "ps_version"),
        (lambda c: c["vision_config"].update(args={"model": "resnet50"}), "vision_config.args.model"),
    ],
)
def test_bad_config_names_the_key(edit: Any, key: str) -> None:
    config = tiny_nemotron_vl_config(VOCAB)
    edit(config)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        parse_nemotron_vl_config(config, num_summary_tokens=8)


def test_config_defaults_and_forms() -> None:
    config = tiny_nemotron_vl_config(VOCAB)
    config["llm_config"].pop("head_dim")
    config["llm_config"]["rope_scaling"] = None
    config["llm_config"]["eos_token_id"] = [7, 8]
    config["vision_config"].pop("intermediate_size")
    config["vision_config"]["mlp_ratio"] = 2.0
    parsed = parse_nemotron_vl_config(config)
    assert (
        parsed.llm.head_dim == 16 and parsed.llm.rope_scaling is None and parsed.llm.eos_token_ids == (7, 8)
    )
    assert parsed.vision.intermediate_size == 64
    huge = {"args": {"model": "vit_huge_patch16_224", "cpe_max_size": 2048}, "max_resolution": 2048}
    config = tiny_nemotron_vl_config(VOCAB, tile_size=512) | {"vision_config": huge, "vit_hidden_size": 1280}
    vision = parse_nemotron_vl_config(config, num_summary_tokens=8).vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1280, 32, 16)
    assert (vision.intermediate_size, vision.max_grid_size, vision.num_summary_tokens) == (5120, 128, 8)


def test_random_state_dict_is_seeded_and_vision_only_matches(tmp_path: Path) -> None:
    config = tiny_nemotron_vl_config(VOCAB)
    full = random_state_dict(config, seed=3)
    vision = random_state_dict(config, seed=3, include_language_model=False)
    assert set(vision) == {n for n in full if not n.startswith("language_model.")}
    assert all(torch.equal(vision[n], full[n]) for n in vision)
    assert not torch.equal(random_state_dict(config, seed=4)["mlp1.1.weight"], full["mlp1.1.weight"])
    assert torch.equal(full["mlp1.0.weight"], torch.ones(128)) and torch.equal(
        full["mlp1.1.bias"], torch.zeros(96)
    )
    shutil.rmtree(tmp_path)
