"""layers.linear: decode-sized CPU batches as weight @ x.T give F.linear's result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmserve.layers.linear import SMALL_BATCH_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    weight = torch.randn(200, 96, generator=generator)
    bias = torch.randn(200, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (rows, 200) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    # each row's result does not depend on the rows beside it (a request's logits are the same
    # alone and in a batch, to rounding)
    torch.testing.assert_close(linear(x[:1], weight, bias), out[:1], rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_shapes_take_f_linear() -> None:
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    batched = torch.randn(2, 3, 16)
    assert torch.equal(linear(batched, weight.float()), F.linear(batched, weight.float()))


def test_module_keeps_nn_linear_parameters() -> None:
    layer = Linear(16, 8, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
