"""The SigLIP vision tower as Idefics3 / SmolVLM checkpoints hold it (`model.vision_model.*`).

Owns normalised pixels -> patch features: a Conv2d patch embedding, a learned position table over
image_size / patch_size patches per side, the shared pre-norm ViT blocks (models/vit.py) and a final
LayerNorm. The Hub names of the blocks (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`)
are mapped onto the shared block by `SIGLIP_WEIGHT_RULES`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.config import SiglipVisionConfig
from vlmserve.models.loader import RenameRule
from vlmserve.models.vit import ViTBlock, ViTBlockConfig

_LAYER = r"vision_model\.encoder\.layers\.\d+\."
# Hub checkpoint fragment -> shared ViTBlock fragment, within each encoder layer
SIGLIP_WEIGHT_RULES: tuple[RenameRule, ...] = (
    RenameRule(_LAYER, "layer_norm1.", "norm1."),
    RenameRule(_LAYER, "layer_norm2.", "norm2."),
    RenameRule(_LAYER, "self_attn.q_proj.", "attn.qkv.", shard=0, num_shards=3),
    RenameRule(_LAYER, "self_attn.k_proj.", "attn.qkv.", shard=1, num_shards=3),
    RenameRule(_LAYER, "self_attn.v_proj.", "attn.qkv.", shard=2, num_shards=3),
    RenameRule(_LAYER, "self_attn.out_proj.", "attn.proj."),
)


def position_ids(rows: int, cols: int, num_patches_per_side: int, device: torch.device) -> torch.Tensor:
    """Position-table index of each patch of a full rows x cols grid, row-major -> [rows * cols].

    transformers' Idefics3VisionEmbeddings buckets fractional coordinates i / rows into
    num_patches_per_side bins in float32; we do the same arithmetic, since for some grid sizes
    (e.g. 19 or 25 per side) the float rounding makes it differ from plain arange.
    """
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    steps = 1.0 / torch.tensor([rows, cols], device=device)  # float32, as 1.0 / int64 tensor in HF
    rows_frac = torch.clamp(torch.arange(rows, device=device, dtype=torch.float32) * steps[0], max=1.0 - 1e-6)
    cols_frac = torch.clamp(torch.arange(cols, device=device, dtype=torch.float32) * steps[1], max=1.0 - 1e-6)
    row_ids = torch.bucketize(rows_frac, boundaries, right=True)
    col_ids = torch.bucketize(cols_frac, boundaries, right=True)
    return (row_ids[:, None] * num_patches_per_side + col_ids[None, :]).reshape(-1)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H / p) * (W / p), hidden], row-major over the patch grid."""
        patches = self.patch_embedding(pixel_values)  # [B, hidden, H / p, W / p]
        rows, cols = patches.shape[-2:]
        # contiguous: else the sum below keeps the conv's [B, hidden, L] memory order, and every
        # LayerNorm of the residual stream copies it back (25 copies per tower call)
        embeddings = patches.flatten(2).transpose(1, 2).contiguous()
        ids = position_ids(rows, cols, self.num_patches_per_side, pixel_values.device)
        return embeddings + self.position_embedding(ids)


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        block = ViTBlockConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            layer_norm_eps=config.layer_norm_eps,
            qkv_bias=True,
            hidden_act=config.hidden_act,
        )
        self.layers = nn.ModuleList([ViTBlock(block) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class SiglipVisionModel(nn.Module):
    """`vision_model`: forward(pixel_values [B, 3, H, W], normalised, H and W multiples of patch_size)
    -> [B, (H / patch) * (W / patch), hidden] after post_layernorm."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
