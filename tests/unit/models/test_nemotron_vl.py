"""NemotronVLForConditionalGeneration: pixel shuffle, image embedding shapes, the runner-facing API."""

from __future__ import annotations

import pytest
import torch

from vlmserve.models.config import parse_nemotron_vl_config
from vlmserve.models.nemotron_vl import (
    NemotronVLForConditionalGeneration,
    merge_image_features,
    pixel_shuffle,
)
from vlmserve.models.random_init import random_state_dict
from vlmserve.testing.tiny_checkpoint import tiny_nemotron_vl_config


def reference_pixel_shuffle(features: torch.Tensor) -> torch.Tensor:
    """MODEL.md by hand: token (i, j) = concat of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1),
    tokens row-major (ps_version v2)."""
    n, h, w, c = features.shape
    out = torch.empty(n, h // 2, w // 2, 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            group = [features[:, 2 * i, 2 * j], features[:, 2 * i, 2 * j + 1]]
            group += [features[:, 2 * i + 1, 2 * j], features[:, 2 * i + 1, 2 * j + 1]]
            out[:, i, j] = torch.cat(group, dim=-1)
    return out


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 8, 8, 5), (3, 4, 6, 2)])
def test_pixel_shuffle_matches_hand_reference(shape: tuple[int, int, int, int]) -> None:
    features = torch.randn(*shape)
    assert torch.equal(pixel_shuffle(features, 0.5, "v2"), reference_pixel_shuffle(features))


def test_pixel_shuffle_v1_is_transposed_v2() -> None:
    features = torch.randn(2, 4, 4, 3)
    assert torch.equal(pixel_shuffle(features, 0.5, "v1"), pixel_shuffle(features, 0.5, "v2").transpose(1, 2))


@pytest.fixture(scope="module")
def model() -> NemotronVLForConditionalGeneration:
    raw = tiny_nemotron_vl_config(256)
    model = NemotronVLForConditionalGeneration(parse_nemotron_vl_config(raw))
    model.load_state_dict(random_state_dict(raw, seed=0), strict=True)
    return model.eval()


def test_tokens_per_tile() -> None:
    assert parse_nemotron_vl_config(tiny_nemotron_vl_config(256)).tokens_per_tile == 4  # (64/16)^2 / 4
    assert parse_nemotron_vl_config(tiny_nemotron_vl_config(256, tile_size=128)).tokens_per_tile == 16
    real = tiny_nemotron_vl_config(256, tile_size=512)
    assert parse_nemotron_vl_config(real).tokens_per_tile == 256  # the 8B model's 512px tiles


@torch.no_grad()
def test_embed_images_shape_and_pipeline(model: NemotronVLForConditionalGeneration) -> None:
    assert model.tokens_per_tile == 4
    pixel_values = torch.rand(3, 3, 64, 64)
    features = model.embed_images(pixel_values)
    assert features.shape == (3 * 4, 64)
    patches = model.vision_model(pixel_values).reshape(3, 4, 4, 32)  # 4x4 patches of hidden 32 per tile
    expected = model.mlp1(reference_pixel_shuffle(patches).reshape(12, 128))
    assert torch.allclose(features, expected, atol=1e-6)
    # tiles are independent: one batch equals one tile at a time
    one_by_one = torch.cat([model.embed_images(tile[None]) for tile in pixel_values])
    assert torch.allclose(features, one_by_one, atol=1e-5)


@torch.no_grad()
def test_embed_images_bfloat16(model: NemotronVLForConditionalGeneration) -> None:
    bf16 = NemotronVLForConditionalGeneration(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    pixel_values = torch.rand(2, 3, 64, 64)
    features = bf16.embed_images(pixel_values.to(torch.bfloat16))
    assert features.dtype == torch.bfloat16 and features.shape == (8, 64)
    reference = model.embed_images(pixel_values)
    assert (features.float() - reference).abs().max() < 0.1 * reference.abs().max()


@torch.no_grad()
def test_text_forward_and_logits(model: NemotronVLForConditionalGeneration) -> None:
    cache = model.make_kv_cache(16, dtype=torch.float32, device="cpu")
    assert cache.key_cache[0].shape == (16, 2, 16) and len(cache.value_cache) == 2
    input_ids = torch.tensor([1, 5, 9, 200])
    hidden = model(model.embed_tokens(input_ids), torch.arange(4), cache)
    assert hidden.shape == (4, 64)
    logits = model.compute_logits(hidden[-1:])
    assert logits.shape == (1, 256) and logits.dtype == torch.float32


def test_merge_image_features() -> None:
    embeds = torch.zeros(10, 2)
    features = torch.arange(12.0).reshape(6, 2)
    merged = merge_image_features(embeds, features, [(1, 4), (7, 2)])
    assert torch.equal(merged[1:5], features[:4]) and torch.equal(merged[7:9], features[4:])
    assert merged[0].abs().sum() == 0 and merged[5:7].abs().sum() == 0 and merged[9].abs().sum() == 0
    with pytest.raises(ValueError):
        merge_image_features(torch.zeros(10, 2), features, [(1, 4)])
