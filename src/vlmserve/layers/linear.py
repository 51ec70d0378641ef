"""Linear layers for decode-sized batches on the CPU.

A decode step multiplies a few rows (one per running request) by every weight matrix of the language
model. On the CPU, torch's `F.linear` (x @ W.T) at 2 to 8 rows runs 1.5-4x slower than at one row,
and one row (a GEMV) uses the memory bandwidth of about one core. The same product computed as
W @ x.T (the weights as the GEMM's big left operand, the few rows as its narrow right one) runs at
the speed of the memory for 1 to 8 rows; a single row is given as two (the row twice) to take the
GEMM's path. Measured on the 2-core build machine (AMD EPYC, AVX2, torch 2.13, fp32), the 210
linears of the SmolLM2-135M decoder: 1 row 42 -> 33-37 ms, 2 rows 64 -> 25 ms, 4 rows 67 -> 31 ms,
8 rows 58 -> 44 ms; its 49280 x 576 lm_head 11.5 -> 6.3 ms at one row (docs/BENCHMARKS.md). From
16 rows on, and for other dtypes and devices, `F.linear` is as fast or faster and is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# at most this many rows go through weight @ x.T
SMALL_BATCH_ROWS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, in]; decode-sized fp32 batches on the CPU as weight @ x.T."""
    rows = x.shape[0]
    if x.dim() != 2 or rows > SMALL_BATCH_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    columns = x.repeat(2, 1) if rows == 1 else x  # one row as two (a copy: a stride-0 view is slow)
    out = torch.mm(weight, columns.t()).t()[:rows].contiguous()  # [rows, out]
    return out if bias is None else out.add_(bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
