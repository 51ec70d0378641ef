"""Seeded random weights with checkpoint names, for tests and the starting point of the demo model's training.

Owns the init rule only: linears, convolutions and embeddings N(0, 0.02) with zero biases, norms
ones/zeros, pos_embed and cls tokens N(0, 0.02), input-conditioner mean/std from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlmserve.layers.norm import RMSNorm
from vlmserve.models.config import parse_nemotron_vl_config
from vlmserve.models.nemotron_vl import NemotronVLForConditionalGeneration
from vlmserve.models.radio import InputConditioner

INIT_STD = 0.02


def _init_tensor(module: nn.Module, name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, InputConditioner):
        values = module.config.norm_mean if name == "norm_mean" else module.config.norm_std
        return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)
    if isinstance(module, nn.LayerNorm | RMSNorm):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if name == "bias":
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * INIT_STD


def random_module_state_dict(
    model: nn.Module, *, seed: int, skip: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Module tensor name -> float32 tensor for every parameter and buffer of `model` (may be on meta),
    drawn in module order from one generator. Names `skip` accepts are left out; skipping only the
    last modules (the language model) leaves the other tensors' values unchanged."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            full_name = f"{module_name}.{name}" if module_name else name
            if skip is None or not skip(full_name):
                state[full_name] = _init_tensor(module, name, tensor.shape, generator)
    return state


def random_state_dict(
    config: dict[str, Any], *, seed: int, include_language_model: bool = True
) -> dict[str, torch.Tensor]:
    """Checkpoint name -> float32 tensor for a Nemotron-VL config.json dict `config` (the plain
    vision_config form).

    The same seed and config give the same tensors. Without the language model, only the
    `vision_model.*` and `mlp1.*` tensors are returned (the same values as in the full dict).
    """
    parsed = parse_nemotron_vl_config(config)
    with torch.device("meta"):
        model = NemotronVLForConditionalGeneration(parsed)
    # the language model comes last, so skipping it leaves the other draws unchanged
    skip = None if include_language_model else (lambda name: name.startswith("language_model."))
    return random_module_state_dict(model, seed=seed, skip=skip)
