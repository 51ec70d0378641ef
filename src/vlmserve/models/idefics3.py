"""Idefics3ForConditionalGeneration (SmolVLM): SigLIP tower -> pixel shuffle -> linear projection -> Llama.

Owns the model's public API for the model runner, the same as every family's: `embed_tokens`,
`embed_images`, `forward`, `compute_logits`, `make_kv_cache`. Parameter names are the Hub
checkpoint's (`model.vision_model.*`, `model.connector.modality_projection.proj`, `model.text_model.*`,
`lm_head`) except inside the SigLIP blocks, which reuse the shared ViT block (see models/siglip.py).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.layers.attention import KVCache
from vlmserve.layers.linear import Linear, linear
from vlmserve.models.config import Idefics3Config
from vlmserve.models.llama import LlamaModel
from vlmserve.models.loader import WeightMapping
from vlmserve.models.projector import pixel_shuffle
from vlmserve.models.siglip import SIGLIP_WEIGHT_RULES, SiglipVisionModel


class Idefics3Connector(nn.Module):
    """`connector`: pixel shuffle by scale_factor, then `modality_projection.proj` (no bias)."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(
            config.vision.hidden_size * config.scale_factor**2, config.text.hidden_size, bias=False
        )

    def forward(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[B, rows * cols, vit_hidden] -> [B, (rows / s) * (cols / s), lm_hidden]."""
        batch, _, hidden = features.shape
        shuffled = pixel_shuffle(features.reshape(batch, rows, cols, hidden), self.scale_factor)
        return self.modality_projection.proj(shuffled.reshape(batch, -1, shuffled.shape[-1]))


class Idefics3Model(nn.Module):
    """`model`: vision_model, connector, text_model (our Llama decoder without its lm_head)."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(config.vision)
        self.connector = Idefics3Connector(config)
        self.text_model = LlamaModel(config.text)


class Idefics3ForConditionalGeneration(nn.Module):
    """The whole VLM. Images arrive as sub-images (tiles) of vision_config.image_size, normalised by
    the processor; each tile gives `tokens_per_tile` features, which replace that tile's run of
    `<image>` tokens (inputs/idefics3.py places the runs)."""

    weight_mapping = WeightMapping(rules=SIGLIP_WEIGHT_RULES)

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics3Model(config)
        # tied: no lm_head module (logits use embed_tokens), and an lm_head in the checkpoint is skipped
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        )
        self.ignored_checkpoint_keys: tuple[str, ...] = ("lm_head.weight",) if self.lm_head is None else ()
        self.tokens_per_tile: int = config.tokens_per_tile

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_tiles, 3, S, S], normalised, S = vision_config.image_size
        -> [num_tiles * tokens_per_tile, lm_hidden], tile-major, row-major within a tile."""
        patch = self.config.vision.patch_size
        rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        features = self.model.vision_model(pixel_values)  # [num_tiles, rows * cols, vit_hidden]
        projected = self.model.connector(features, rows, cols)  # [num_tiles, tokens_per_tile, lm_hidden]
        return projected.reshape(-1, projected.shape[-1])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> [T, lm_hidden]."""
        return self.model.text_model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """inputs_embeds [T, lm_hidden], positions [T] int64 -> hidden [T, lm_hidden] after the final norm;
        token t's key/value goes to cache slot positions[t] and it attends to every slot <= positions[t]."""
        return self.model.text_model(inputs_embeds, positions, kv_cache)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, lm_hidden] -> logits [N, vocab] in float32."""
        weight = self.model.text_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden_states, weight).float()

    def make_kv_cache(self, max_tokens: int, *, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """An empty cache for one sequence of up to `max_tokens` tokens."""
        c = self.config.text
        return KVCache.allocate(
            c.num_hidden_layers, max_tokens, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device
        )
