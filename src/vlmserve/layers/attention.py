"""Causal self-attention over a KV cache, and the cache itself.

This module is the only place that knows the cache layout. Today that is one sequence in a
contiguous cache: the key/value of the token at position p live in slot p. A paged cache replaces
`KVCache`, `AttentionMetadata`, `store_kv` and `gather_kv` later; the model code only builds the
metadata once per forward and calls `cached_attention` in each layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Per-layer key/value tensors of one sequence.

    Shape: key_cache[i], value_cache[i]: [max_tokens, num_kv_heads, head_dim].
    Slot p holds the key/value of the token at position p; slots beyond the highest written
    position are garbage and never read.
    """

    key_cache: list[torch.Tensor]
    value_cache: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        max_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (max_tokens, num_kv_heads, head_dim)
        return cls(
            key_cache=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            value_cache=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_tokens(self) -> int:
        return self.key_cache[0].shape[0]


@dataclass(frozen=True)
class AttentionMetadata:
    """What every layer's attention needs for one forward, built once (one host sync, not one per layer)."""

    # [T] int64: the position of each token, which is also its cache slot
    positions: torch.Tensor
    # slots [0, num_slots) are read: up to the highest position in this forward
    num_slots: int
    # [T, num_slots] bool, True = attend: slot s is visible to token t when s <= positions[t]
    mask: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor) -> AttentionMetadata:
        num_slots = int(positions.max().item()) + 1
        slots = torch.arange(num_slots, device=positions.device)
        return cls(positions=positions, num_slots=num_slots, mask=slots[None, :] <= positions[:, None])


def store_kv(
    kv_cache: KVCache, layer_idx: int, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] of the tokens at `positions` [T] into their slots."""
    kv_cache.key_cache[layer_idx][positions] = key
    kv_cache.value_cache[layer_idx][positions] = value


def gather_kv(kv_cache: KVCache, layer_idx: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of slots [0, num_slots): each [num_slots, num_kv_heads, head_dim]."""
    return kv_cache.key_cache[layer_idx][:num_slots], kv_cache.value_cache[layer_idx][:num_slots]


def cached_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    metadata: AttentionMetadata,
    kv_cache: KVCache,
    layer_idx: int,
    scale: float,
) -> torch.Tensor:
    """Store this step's key/value, then attend each query causally over the cache.

    query [T, num_heads, head_dim]; key/value [T, num_kv_heads, head_dim]. Token t sees every cache
    slot <= its position (earlier chunks and itself). Returns [T, num_heads, head_dim].
    Grouped-query attention: num_heads is a multiple of num_kv_heads.
    """
    store_kv(kv_cache, layer_idx, key, value, metadata.positions)
    cached_key, cached_value = gather_kv(kv_cache, layer_idx, metadata.num_slots)  # [S, kv_heads, head_dim]
    group = query.shape[1] // cached_key.shape[1]
    if group > 1:
        cached_key = cached_key.repeat_interleave(group, dim=1)  # [S, num_heads, head_dim]
        cached_value = cached_value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),  # [num_heads, T, head_dim]
        cached_key.transpose(0, 1),  # [num_heads, S, head_dim]
        cached_value.transpose(0, 1),
        attn_mask=metadata.mask,
        scale=scale,
    )  # [num_heads, T, head_dim]
    return out.transpose(0, 1)
