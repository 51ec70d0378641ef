"""The ViT MLP's fused CPU path (oneDNN linear + bias + GELU in one call) against the plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmserve.models import vit
from vlmserve.models.vit import ViTBlockConfig, ViTMLP


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
@torch.inference_mode()
def test_fused_linear_gelu_matches_the_modules(hidden_act: str) -> None:
    torch.manual_seed(0)
    mlp = ViTMLP(ViTBlockConfig(64, 4, 256, hidden_act=hidden_act)).eval()
    x = torch.randn(3, 17, 64)
    assert vit._use_fused_linear_gelu(x, mlp.fc1.weight)
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate=mlp.approximate))
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_the_fused_path_is_cpu_float32_inference_only() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(2, 4)
    assert not vit._use_fused_linear_gelu(x, weight)  # autograd wants the weight's gradient
    with torch.no_grad():
        assert vit._use_fused_linear_gelu(x, weight)
        assert not vit._use_fused_linear_gelu(x.bfloat16(), weight.bfloat16())
