"""Building blocks between a vision tower and a language model, shared by the VLM families.

Owns the patch-feature pixel shuffle (space-to-depth) that InternVL-style (Nemotron-VL) and Idefics3
connectors apply before their projection; the projections themselves keep their checkpoint names in
each family's module.
"""

from __future__ import annotations

import torch


def pixel_shuffle(features: torch.Tensor, factor: int, *, keep_row_order: bool = True) -> torch.Tensor:
    """[N, H, W, C] -> [N, H / factor, W / factor, C * factor^2].

    Output (i, j) concatenates the factor x factor patch group at (f*i, f*j) row by row:
    (fi, fj), (fi, fj+1), ..., (fi+1, fj), ... (InternVL "v2" and Idefics3 both do exactly this).
    With keep_row_order=False the result stays transposed ([N, W / f, H / f, ...]), as InternVL's
    original "v1" did.
    """
    n, h, w, c = features.shape
    if h % factor or w % factor:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the shuffle factor {factor}")
    x = features.reshape(n, h, w // factor, c * factor)  # merge column groups
    x = x.permute(0, 2, 1, 3)  # [N, W/f, H, C*f]
    x = x.reshape(n, w // factor, h // factor, c * factor * factor)  # merge row groups
    if not keep_row_order:
        return x
    return x.permute(0, 2, 1, 3).contiguous()  # [N, H/f, W/f, C*f^2]
