"""Our Idefics3 model vs transformers' Idefics3ForConditionalGeneration on a tiny random config, fp32.

transformers' state dict (Hub names) is written as a checkpoint and loaded through our registry, so the
SigLIP name mapping onto the shared ViT block (separate q/k/v -> fused qkv) is under test too.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from vlmserve.models.checkpoint_writer import write_checkpoint
from vlmserve.models.idefics3 import Idefics3ForConditionalGeneration
from vlmserve.models.registry import load_model
from vlmserve.testing.smolvlm_checkpoint import tiny_idefics3_config

VOCAB = 256
IMAGE_ID, FAKE_ID, GLOBAL_ID, ROW_COL_ID = 255, 254, 253, 200
TOKENS_PER_TILE = 4  # (64 / 16)^2 / 2^2


def hf_model(config: dict, seed: int) -> transformers.Idefics3ForConditionalGeneration:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_config = transformers.Idefics3Config(**kwargs)
    hf_config._attn_implementation = "eager"
    hf_config.text_config._attn_implementation = "eager"
    hf_config.vision_config._attn_implementation = "eager"
    model = transformers.Idefics3ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # bigger than the 0.02 init, so greedy picks are decisive
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(
    request, tmp_path_factory
) -> tuple[Idefics3ForConditionalGeneration, transformers.PreTrainedModel]:
    tie = request.param
    config = tiny_idefics3_config(VOCAB)
    config.update(image_token_id=IMAGE_ID, tie_word_embeddings=tie)
    config["text_config"]["tie_word_embeddings"] = tie
    theirs = hf_model(config, seed=int(tie))
    # tied tensors share storage, which safetensors refuses: write copies (lm_head is then skipped)
    state = {name: tensor.detach().clone() for name, tensor in theirs.state_dict().items()}
    out_dir = tmp_path_factory.mktemp("idefics3-parity")
    write_checkpoint(out_dir, config, state, tokenizer_dir=None, max_shard_bytes=200_000)
    loaded = load_model(out_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    assert isinstance(loaded.model, Idefics3ForConditionalGeneration)
    assert (loaded.model.lm_head is None) == tie
    return loaded.model, theirs


def prompt_with_split_image(rows: int, cols: int) -> list[int]:
    """Text, then the Idefics3 expansion (row/col tags all ROW_COL_ID; "\\n" as id 10), then text."""
    ids = [1, 17, 42]
    for _ in range(rows):
        for _ in range(cols):
            ids += [FAKE_ID, ROW_COL_ID] + [IMAGE_ID] * TOKENS_PER_TILE
        ids.append(10)
    ids += [10, FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TOKENS_PER_TILE + [FAKE_ID, 33, 7, 99]
    return ids


@torch.no_grad()
def our_prefill(model: Idefics3ForConditionalGeneration, ids: list[int], pixel_values: torch.Tensor, cache):
    """Logits [T, vocab]: embed, write each tile's features over its own run of image tokens (as the
    runner does with one ImageInput per tile), run the decoder."""
    input_ids = torch.tensor(ids)
    embeds = model.embed_tokens(input_ids)
    starts = [i for i, t in enumerate(ids) if t == IMAGE_ID and (i == 0 or ids[i - 1] != IMAGE_ID)]
    assert len(starts) == pixel_values.shape[0]
    for tile, start in enumerate(starts):
        features = model.embed_images(pixel_values[tile : tile + 1])
        assert features.shape == (TOKENS_PER_TILE, embeds.shape[-1])
        embeds[start : start + TOKENS_PER_TILE] = features
    return model.compute_logits(model(embeds, torch.arange(len(ids)), cache))


@pytest.mark.parametrize("rows,cols", [(2, 2), (1, 3), (0, 0)], ids=["2x2", "1x3", "unsplit"])
@torch.no_grad()
def test_logits_match(models, rows: int, cols: int) -> None:
    ours, theirs = models
    ids = (
        prompt_with_split_image(rows, cols)
        if rows
        else [1, 5, FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * 4 + [FAKE_ID, 9]
    )
    num_tiles = rows * cols + 1 if rows else 1
    pixel_values = torch.randn(
        num_tiles, 3, 64, 64, generator=torch.Generator().manual_seed(rows * 10 + cols)
    )
    expected = theirs(input_ids=torch.tensor([ids]), pixel_values=pixel_values[None]).logits[0]
    cache = ours.make_kv_cache(len(ids), dtype=torch.float32, device="cpu")
    actual = our_prefill(ours, ids, pixel_values, cache)
    assert actual.shape == expected.shape == (len(ids), VOCAB)
    assert (actual - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_vision_tower_and_connector_match(models) -> None:
    ours, theirs = models
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    expected = theirs.model.get_image_features(pixel_values[None]).pooler_output[0]  # [3 * 4, hidden]
    assert (ours.embed_images(pixel_values) - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_tokens_match(models) -> None:
    ours, theirs = models
    ids = prompt_with_split_image(1, 2)
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    num_new = 12
    expected = theirs.generate(
        input_ids=torch.tensor([ids]),
        pixel_values=pixel_values[None],
        max_new_tokens=num_new,
        do_sample=False,
        min_new_tokens=num_new,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    cache = ours.make_kv_cache(len(ids) + num_new, dtype=torch.float32, device="cpu")
    logits = our_prefill(ours, ids, pixel_values, cache)
    generated = [int(logits[-1].argmax())]
    while len(generated) < num_new:
        position = torch.tensor([len(ids) + len(generated) - 1])
        hidden = ours(ours.embed_tokens(torch.tensor(generated[-1:])), position, cache)
        generated.append(int(ours.compute_logits(hidden)[-1].argmax()))
    assert generated == expected
