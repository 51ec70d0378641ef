"""Llama decoder over a KV cache, with HF parameter names (`model.layers.N.self_attn.q_proj`, ...).

Owns the language model math: embeddings, decoder layers with GQA and RoPE, final norm, lm_head.
Tokens come flat ([T, hidden], one sequence); the cache layout stays in layers/attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.layers.attention import AttentionMetadata, KVCache, cached_attention
from vlmserve.layers.linear import Linear, linear
from vlmserve.layers.norm import RMSNorm
from vlmserve.layers.rotary import RotaryEmbedding, apply_rotary_emb
from vlmserve.models.config import LlamaConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        metadata: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        query = self.q_proj(hidden_states).view(num_tokens, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(num_tokens, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(num_tokens, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary_emb(query, key, *cos_sin)
        out = cached_attention(query, key, value, metadata, kv_cache, self.layer_idx, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inner, bias=bias)
        self.up_proj = Linear(hidden, inner, bias=bias)
        self.down_proj = Linear(inner, hidden, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        metadata: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
    ) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden_states), metadata, cos_sin, kv_cache)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """inputs_embeds [T, hidden], positions [T] int64 -> hidden [T, hidden] after the final norm."""
        cos_sin = self.rotary_emb(positions, inputs_embeds.dtype)  # 2 x [T, head_dim]
        metadata = AttentionMetadata.build(positions, kv_cache)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, metadata, cos_sin, kv_cache)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """`language_model`: LlamaModel + lm_head. With tie_word_embeddings there is no lm_head module:
    logits use `model.embed_tokens.weight`, so a meta-device build and `to_empty` cannot untie them."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def make_kv_cache(self, max_tokens: int, *, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        c = self.config
        return KVCache.allocate(
            c.num_hidden_layers, max_tokens, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        return self.model(inputs_embeds, positions, kv_cache)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> logits [N, vocab] in float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden_states, weight).float()
