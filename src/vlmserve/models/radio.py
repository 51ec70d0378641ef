"""The C-RADIO vision tower: a ViT with cropped position embeddings (CPE), checkpoint names under
`radio_model.` (docs/CHECKPOINT.md).

Owns pixels in [0, 1] -> patch features; summary tokens (cls + registers) are dropped from the
output. The position-embedding crop matches transformers' `RadioModel._interpolate_position_embedding`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.config import RadioConfig
from vlmserve.models.vit import ViTBlock, ViTBlockConfig


class InputConditioner(nn.Module):
    """(pixels - mean) / std in float32, cast back; mean/std are checkpoint buffers [3, 1, 1]."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("norm_mean", torch.empty(3, 1, 1))
        self.register_buffer("norm_std", torch.empty(3, 1, 1))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill mean/std from the config (also after `to_empty`, for checkpoints without these buffers)."""
        with torch.no_grad():
            self.norm_mean.copy_(torch.tensor(self.config.norm_mean).view(3, 1, 1))
            self.norm_std.copy_(torch.tensor(self.config.norm_std).view(3, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        normalized = (pixel_values.float() - self.norm_mean.float()) / self.norm_std.float()
        return normalized.to(pixel_values.dtype)


class ClsToken(nn.Module):
    def __init__(self, num_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(num_tokens, hidden_size))


class PatchGenerator(nn.Module):
    """Patchify, project, add the cropped position embedding, prepend the summary tokens."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.max_grid = config.max_grid_size
        patch_dim = 3 * config.patch_size**2
        self.embedder = nn.Linear(patch_dim, config.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.max_grid**2, config.hidden_size))
        self.cls_token = ClsToken(config.num_summary_tokens, config.hidden_size)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, rows * cols, 3 * p * p], each patch flattened in (c, y, x) order."""
        p = self.patch_size
        batch, channels, height, width = pixel_values.shape
        rows, cols = height // p, width // p
        patches = pixel_values.reshape(batch, channels, rows, p, cols, p)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """CPE for a rows x cols grid -> [1, rows * cols, hidden].

        The table is resized (bilinear, align_corners=False, in float32) to a square of the longer
        side, cropped to the top-left rows x cols, and resized again only if still off.
        """
        table = self.pos_embed.reshape(1, self.max_grid, self.max_grid, -1).permute(
            0, 3, 1, 2
        )  # [1, C, G, G]
        side = max(rows, cols)
        pos = F.interpolate(table.float(), size=(side, side), mode="bilinear", align_corners=False).to(dtype)
        pos = pos[..., :rows, :cols]  # [1, C, rows, cols]
        if pos.shape[-2:] != (rows, cols):
            pos = F.interpolate(pos.float(), size=(rows, cols), mode="bilinear", align_corners=False).to(
                dtype
            )
        return pos.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, H, W] -> [B, num_summary + rows * cols, hidden]."""
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        patches = self.embedder(self.patchify(pixel_values))  # [B, rows * cols, hidden]
        patches = patches + self.position_embedding(rows, cols, patches.dtype)
        summary = self.cls_token.token.unsqueeze(0).expand(patches.shape[0], -1, -1)
        return torch.cat([summary, patches], dim=1)


class VisionTransformer(nn.Module):
    """`radio_model.model`: patch generator and blocks; no final norm."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.patch_generator = PatchGenerator(config)
        block_config = ViTBlockConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            layer_norm_eps=config.layer_norm_eps,
            qkv_bias=config.qkv_bias,
            hidden_act="gelu",
        )
        self.blocks = nn.ModuleList([ViTBlock(block_config) for _ in range(config.num_hidden_layers)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.patch_generator(pixel_values)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class RadioModel(nn.Module):
    """`radio_model`: input conditioner + ViT."""

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.input_conditioner = InputConditioner(config)
        self.model = VisionTransformer(config)


class RadioVisionModel(nn.Module):
    """The vision tower as the VLM holds it (`vision_model.radio_model.*`).

    forward(pixel_values [B, 3, H, W] in [0, 1], H and W multiples of patch_size)
    -> patch features [B, (H / patch) * (W / patch), hidden], row-major over the patch grid.
    """

    def __init__(self, config: RadioConfig) -> None:
        super().__init__()
        self.config = config
        self.radio_model = RadioModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = self.radio_model.input_conditioner(pixel_values)
        hidden_states = self.radio_model.model(pixel_values)  # [B, num_summary + patches, hidden]
        return hidden_states[:, self.config.num_summary_tokens :]
