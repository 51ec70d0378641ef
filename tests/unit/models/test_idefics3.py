"""Idefics3 model layer without transformers: config, the SigLIP -> shared ViT block name mapping, loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmserve.errors import ModelLoadError
from vlmserve.models.checkpoint_writer import write_checkpoint
from vlmserve.models.config import parse_idefics3_config
from vlmserve.models.idefics3 import Idefics3ForConditionalGeneration
from vlmserve.models.registry import load_model
from vlmserve.testing.smolvlm_checkpoint import (
    random_idefics3_state_dict,
    smolvlm_256m_config,
    tiny_idefics3_config,
)

REPO = Path(__file__).resolve().parents[3]


def test_smolvlm_256m_config_sizes() -> None:
    config = parse_idefics3_config(smolvlm_256m_config())
    assert config.tokens_per_tile == 64
    assert (config.text.hidden_size, config.text.num_hidden_layers, config.text.head_dim) == (576, 30, 64)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 256_484_928  # "256M": the lm_head is untied


def test_hub_names_round_trip_through_the_mapping() -> None:
    state = random_idefics3_state_dict(tiny_idefics3_config(300), seed=0)
    assert "model.vision_model.encoder.layers.1.self_attn.v_proj.bias" in state
    assert "model.text_model.layers.1.self_attn.v_proj.weight" in state  # the text model is not remapped
    assert not any(".attn.qkv." in name or ".norm1." in name for name in state)
    mapping = Idefics3ForConditionalGeneration.weight_mapping
    assert mapping.to_model("model.vision_model.encoder.layers.1.self_attn.k_proj.weight") == (
        "model.vision_model.encoder.layers.1.attn.qkv.weight",
        1,
        3,
    )


def test_loads_fused_qkv_from_separate_tensors(tmp_path: Path) -> None:
    config = tiny_idefics3_config(300)
    state = random_idefics3_state_dict(config, seed=1)
    write_checkpoint(tmp_path, config, state, tokenizer_dir=None)
    model = load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), progress=False).model
    qkv = model.model.vision_model.encoder.layers[0].attn.qkv.weight
    prefix = "model.vision_model.encoder.layers.0.self_attn."
    expected = torch.cat([state[prefix + p + "_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    config = tiny_idefics3_config(300)
    state = random_idefics3_state_dict(config, seed=1)
    del state["model.vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    write_checkpoint(tmp_path, config, state, tokenizer_dir=None)
    with pytest.raises(ModelLoadError, match=r"layers\.1\.attn\.qkv\.weight"):
        load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), progress=False)


def test_tool_writes_a_loadable_tiny_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "smolvlm"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_smolvlm_checkpoint.py"),
            str(out),
            "--tiny",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    loaded = load_model(out, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    assert loaded.raw_config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_tool_writes_the_full_size_checkpoint(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SmolVLM-256M-Instruct's size: about 25 s and 2 GB of memory to write, 513 MB on disk in bf16.
    Runs only when asked for (`pytest -m slow`)."""
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("full-size checkpoint: run with -m slow")
    out = tmp_path / "smolvlm-256m"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_smolvlm_checkpoint.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    loaded = load_model(out, dtype=torch.bfloat16, device=torch.device("cpu"), progress=False)
    assert sum(p.numel() for p in loaded.model.parameters()) == 256_484_928
