"""Llama_Nemotron_Nano_VL: C-RADIO tower -> pixel shuffle -> `mlp1` projector -> Llama decoder.

Owns the model's public API for the model runner (shapes in each docstring). It knows nothing of
requests or prompts: the runner scatters image features into the prompt embeddings at offsets the
processor computed (see `merge_image_features`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmserve.layers.attention import KVCache
from vlmserve.models.config import NemotronVLConfig
from vlmserve.models.llama import LlamaForCausalLM
from vlmserve.models.projector import pixel_shuffle as shuffle_patches
from vlmserve.models.radio import RadioVisionModel


def pixel_shuffle(features: torch.Tensor, scale: float, ps_version: str = "v2") -> torch.Tensor:
    """InternVL pixel shuffle: [N, H, W, C] -> [N, H * scale, W * scale, C / scale^2].

    With scale 0.5, output (i, j) concatenates the 2x2 patch group (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) in that order; "v2" swaps H and W back so rows stay rows ("v1"
    leaves them transposed, as the original InternVL did).
    """
    return shuffle_patches(features, round(1 / scale), keep_row_order=ps_version != "v1")


def merge_image_features(
    inputs_embeds: torch.Tensor,
    image_features: torch.Tensor,
    offsets_and_lengths: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Write image features into prompt embeddings, in place, and return them.

    inputs_embeds [T, hidden]; image_features [sum(lengths), hidden], the images' features
    concatenated in the order of `offsets_and_lengths`; each (offset, length) is the span of one
    image's `<image>` tokens in this chunk.
    """
    start = 0
    for offset, length in offsets_and_lengths:
        inputs_embeds[offset : offset + length] = image_features[start : start + length]
        start += length
    if start != image_features.shape[0]:
        raise ValueError(f"{image_features.shape[0]} image feature rows for spans totalling {start}")
    return inputs_embeds


class NemotronVLForConditionalGeneration(nn.Module):
    """The whole VLM; parameter names are those of the Hub checkpoint (docs/CHECKPOINT.md)."""

    # checkpoint tensors the loader skips when the model has no such tensor: RADIO's summary_idxs
    # buffer, and an lm_head written beside tied embeddings
    ignored_checkpoint_keys: tuple[str, ...] = ("*.summary_idxs", "language_model.lm_head.weight")
    # model tensors a checkpoint may omit: kept at their config values
    optional_checkpoint_keys: tuple[str, ...] = (
        "*.input_conditioner.norm_mean",
        "*.input_conditioner.norm_std",
    )

    def __init__(self, config: NemotronVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = RadioVisionModel(config.vision)
        shuffled = config.vit_hidden_size * int(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled),
            nn.Linear(shuffled, config.projector_hidden_size),
            nn.GELU(),
            nn.Linear(config.projector_hidden_size, config.llm.hidden_size),
        )
        self.language_model = LlamaForCausalLM(config.llm)
        self.tokens_per_tile: int = config.tokens_per_tile

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_tiles, 3, S, S] in [0, 1], S = force_image_size
        -> [num_tiles * tokens_per_tile, lm_hidden], tile-major, row-major within a tile."""
        return self.mlp1(self.shuffled_features(pixel_values))

    def shuffled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's features after the pixel shuffle, before mlp1:
        [num_tiles * tokens_per_tile, vit_hidden / downsample_ratio^2]."""
        features = self.vision_model(pixel_values)  # [num_tiles, grid * grid, vit_hidden]
        num_tiles, num_patches, hidden = features.shape
        grid = int(num_patches**0.5)
        features = features.reshape(num_tiles, grid, grid, hidden)
        features = pixel_shuffle(features, self.config.downsample_ratio, self.config.ps_version)
        return features.reshape(-1, features.shape[-1])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> [T, lm_hidden]."""
        return self.language_model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """inputs_embeds [T, lm_hidden], positions [T] int64 -> hidden [T, lm_hidden] after the final norm.

        The key/value of token t is written to cache slot positions[t]; token t attends to every
        slot <= positions[t], so earlier chunks must already be in the cache.
        """
        return self.language_model(inputs_embeds, positions, kv_cache)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, lm_hidden] -> logits [N, vocab] in float32."""
        return self.language_model.compute_logits(hidden_states)

    def make_kv_cache(self, max_tokens: int, *, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """An empty cache for one sequence of up to `max_tokens` tokens."""
        return self.language_model.make_kv_cache(max_tokens, dtype=dtype, device=device)
