"""bench.int8: every linear of the language model is swapped, the rest of the model is untouched, and
the int8 logits follow the fp32 ones (on a tiny random checkpoint, through vlmserve's loader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench import int8

from vlmserve.layers.linear import Linear
from vlmserve.models.registry import load_model


@pytest.mark.parametrize("keep", [set(), {"down_proj", "lm_head"}])
def test_quantize_swaps_the_linears_and_keeps_the_logits_close(
    tiny_checkpoint_dir: Path, keep: set[str]
) -> None:
    torch.manual_seed(0)
    lm = load_model(tiny_checkpoint_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    lm = lm.model.language_model
    ids = torch.randint(0, 500, (24,))
    reference, ref_tokens, _ = int8.run(lm, lm.compute_logits, ids, steps=4)
    linears = {name for name, m in lm.named_modules() if isinstance(m, Linear)}
    logits_fn = int8.quantize(lm, keep, reduce_range=True)
    kept = {name for name in linears if name.rsplit(".", 1)[-1] in keep}
    assert {name for name, m in lm.named_modules() if isinstance(m, Linear)} == kept
    swapped = {name for name, m in lm.named_modules() if isinstance(m, int8.DynamicInt8Linear)}
    assert swapped == linears - kept and swapped
    quantized, tokens, _ = int8.run(lm, logits_fn, ids, steps=4)
    assert quantized.shape == reference.shape and len(tokens) == len(ref_tokens) == 4
    # random weights have no outlier activations: 7-bit activations stay within a few percent
    error = (quantized - reference).norm() / reference.norm()
    assert error < 0.1, error.item()
