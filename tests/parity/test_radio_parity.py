"""Our C-RADIO tower vs transformers' RadioModel on a tiny random config, fp32.

Our modules carry the Hub checkpoint names (fused `attn.qkv`, `patch_generator.embedder`, ...);
they are mapped onto RadioModel's names by splitting qkv into q/k/v and renaming the rest.
Everything of the C-RADIO tower the VLM uses is expressible in RadioModel: its LayerScale is set
to 1.0 (C-RADIO has none) and its summary output is ignored (the VLM drops the summary tokens).

Not covered by this parity: transformers resizes the position table with align_corners=False, as
we do; some older copies of the original RADIO code use align_corners=True, which would give
slightly different position embeddings for grids smaller than the table.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from vlmserve.models.config import RadioConfig
from vlmserve.models.radio import RadioVisionModel

CONFIG = RadioConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    patch_size=16,
    max_img_size=256,  # a 16 x 16 position table
    num_cls_tokens=2,
    num_registers=2,
    layer_norm_eps=1e-6,
    norm_mean=(0.5, 0.4, 0.3),
    norm_std=(0.2, 0.25, 0.3),
)


def hf_name_and_tensor(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One of our (checkpoint) names -> RadioModel's names; the fused qkv becomes three tensors."""
    name = name.removeprefix("radio_model.").removeprefix("model.")
    renames = {
        "patch_generator.embedder.weight": "embeddings.patch_projection.weight",
        "patch_generator.pos_embed": "embeddings.position_embedding",
        "patch_generator.cls_token.token": "embeddings.cls_register_token",
    }
    if name in renames:
        return [(renames[name], tensor)]
    name = name.replace("blocks.", "encoder.layer.").replace(".attn.proj.", ".attention.o_proj.")
    if ".attn.qkv." in name:
        q, k, v = tensor.chunk(3, dim=0)  # rows [q; k; v], as timm's reshape(B, N, 3, heads, head_dim)
        parts = zip("qkv", (q, k, v), strict=True)
        return [(name.replace(".attn.qkv.", f".attention.{p}_proj."), t) for p, t in parts]
    return [(name, tensor)]


@pytest.fixture(scope="module")
def models() -> tuple[RadioVisionModel, transformers.RadioModel]:
    torch.manual_seed(0)
    ours = RadioVisionModel(CONFIG).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.normal_(0.0, 1.0 if "norm" in name and name.endswith("weight") else 0.1)
    hf_config = transformers.RadioConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4.0,
        patch_size=16,
        max_img_size=256,
        num_cls_tokens=2,
        num_registers=2,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        norm_mean=list(CONFIG.norm_mean),
        norm_std=list(CONFIG.norm_std),
        layerscale_value=1.0,
        attn_implementation="eager",
    )
    theirs = transformers.RadioModel(hf_config).eval()
    mapped = dict(pair for n, t in ours.state_dict().items() for pair in hf_name_and_tensor(n, t))
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(
        ["summary_idxs"] + [f"encoder.layer.{i}.layer_scale{j}.lambda1" for i in range(2) for j in (1, 2)]
    )
    with torch.no_grad():
        for i in range(2):
            for layer_scale in (theirs.encoder.layer[i].layer_scale1, theirs.encoder.layer[i].layer_scale2):
                layer_scale.lambda1.fill_(1.0)
    return ours, theirs


@pytest.mark.parametrize(
    "height,width",
    [(64, 64), (64, 128), (128, 64), (48, 80), (256, 256), (320, 288)],
    ids=["64x64", "64x128", "128x64", "48x80", "table-size", "bigger-than-table"],
)
@torch.no_grad()
def test_patch_features_match(
    models: tuple[RadioVisionModel, transformers.RadioModel], height: int, width: int
) -> None:
    ours, theirs = models
    pixel_values = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    expected = theirs(pixel_values).features  # [2, patches, hidden]
    actual = ours(pixel_values)
    assert actual.shape == (2, (height // 16) * (width // 16), 32)
    assert (actual - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_position_embedding_is_cropped_not_stretched(
    models: tuple[RadioVisionModel, transformers.RadioModel],
) -> None:
    """A square grid of the table's size uses the table as is; a non-square grid crops the resized square."""
    ours, _ = models
    generator = ours.radio_model.model.patch_generator
    table = generator.pos_embed  # [1, 256, hidden]
    assert torch.allclose(generator.position_embedding(16, 16, torch.float32), table, atol=1e-6)
    square = generator.position_embedding(8, 8, torch.float32).reshape(8, 8, -1)
    wide = generator.position_embedding(4, 8, torch.float32).reshape(4, 8, -1)
    assert torch.allclose(wide, square[:4], atol=1e-6)
