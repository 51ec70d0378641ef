"""Shared ViT encoder pieces: bidirectional attention with a fused qkv, the two-layer MLP, the pre-norm block.

Owns the block math every vision tower uses (C-RADIO, SigLIP). Module names follow the timm layout
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`); a tower whose checkpoint names its
tensors otherwise (SigLIP: `layer_norm1`, separate `q_proj`/`k_proj`/`v_proj`, `out_proj`) maps them
onto these with a `WeightMapping` (models/loader.py) instead of copying the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# config.json `hidden_act` -> F.gelu's `approximate`
_GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class ViTBlockConfig:
    """The sizes one pre-norm block needs; each tower's config builds it."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # "gelu" (exact, C-RADIO) or "gelu_pytorch_tanh" (SigLIP)
    hidden_act: str = "gelu"


class ViTAttention(nn.Module):
    """Bidirectional multi-head attention with a fused qkv projection (rows [q; k; v])."""

    def __init__(self, config: ViTBlockConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


class ViTMLP(nn.Module):
    def __init__(self, config: ViTBlockConfig) -> None:
        super().__init__()
        if config.hidden_act not in _GELU_APPROXIMATIONS:
            raise ValueError(
                f"hidden_act {config.hidden_act!r} is not supported ({sorted(_GELU_APPROXIMATIONS)})"
            )
        self.approximate = _GELU_APPROXIMATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _use_fused_linear_gelu(hidden_states, self.fc1.weight):
            # oneDNN's linear with the bias and GELU in its epilogue: on CPU a separate GELU over the
            # [tokens, intermediate] activations cost about as much as the fc1 matmul itself
            hidden = torch.ops.mkldnn._linear_pointwise(
                hidden_states, self.fc1.weight, self.fc1.bias, "gelu", [], self.approximate
            )
        else:
            hidden = F.gelu(self.fc1(hidden_states), approximate=self.approximate)
        return self.fc2(hidden)


def _use_fused_linear_gelu(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """The oneDNN fused linear + GELU applies: CPU, float32 (oneDNN's bf16 kernels need AVX-512
    or AMX, and bf16 is the slower choice on the CPUs without them anyway), no autograd needed."""
    return (
        hidden_states.device.type == "cpu"
        and hidden_states.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and (weight.requires_grad or hidden_states.requires_grad))
    )


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)); no LayerScale, no drop path."""

    def __init__(self, config: ViTBlockConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = ViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] -> [B, L, hidden]."""
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))
