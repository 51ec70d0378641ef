"""RMSNorm as Llama uses it: statistics in float32, the weight applied in the input dtype.

Owns normalisation layers only; no residual fusion yet (a later optimisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, computed like HF `LlamaRMSNorm` so logits match bit for bit."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same math in one fused op (float32 in and out, nothing to cast): 61 norms a token
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)
        input_dtype = hidden_states.dtype
        x = hidden_states.float()  # [..., hidden]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
