"""Rotary position embeddings (RoPE), plain or with Llama 3.1 `rope_scaling` (rope_type "llama3").

Owns the inverse frequencies and the rotation of query/key heads. The frequencies are not a module
buffer: they are recomputed lazily per device, so a model built on the meta device and moved with
`to_empty` needs no re-initialisation step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling (HF `_compute_llama3_parameters`): long wavelengths are divided by
    `factor`, short ones kept, and the band in between interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_inv_freq(head_dim: int, rope_theta: float, scaling: Llama3RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 on the CPU."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # wavelengths longer than the pre-training context: scale the frequency down by `factor`
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, num_heads, head_dim] and key [T, num_kv_heads, head_dim] by cos/sin [T, head_dim]
    (the non-interleaved "rotate_half" layout of HF Llama checkpoints).

    `sin` is the signed sine from RotaryEmbedding: its first half negated, so that HF's
    rotate_half(x) * sin == x.roll(head_dim // 2) * signed_sin (the same products), three ops per
    tensor instead of seven; every layer of every step runs this.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, head_dim]
    half = query.shape[-1] // 2
    return (
        torch.addcmul(query * cos, query.roll(half, dims=-1), sin),
        torch.addcmul(key * cos, key.roll(half, dims=-1), sin),
    )


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for token positions. Has no parameters and no state_dict entries."""

    def __init__(self, head_dim: int, rope_theta: float, scaling: Llama3RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scaling = scaling
        self._inv_freq: torch.Tensor | None = None

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.scaling).to(device)
        return self._inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos, signed sin), each [T, head_dim] in `dtype` (computed in
        float32); the sine's first half is negated, as `apply_rotary_emb` expects."""
        inv_freq = self._inv_freq_on(positions.device)  # [head_dim // 2]
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim // 2]
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)
