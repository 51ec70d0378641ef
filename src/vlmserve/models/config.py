"""Parse a checkpoint's config.json dict into frozen dataclasses: Llama_Nemotron_Nano_VL (docs/CHECKPOINT.md)
and Idefics3 (SmolVLM).

Owns key names, defaults and validation; knows nothing about weights except the one shape the
Hub's remote-code RADIO form needs (the summary-token count). Bad or missing keys raise
ModelLoadError naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmserve.errors import ModelLoadError
from vlmserve.layers.rotary import Llama3RopeScaling

# OpenAI CLIP mean/std: what C-RADIO's input conditioner holds.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# timm ViT names -> (width, depth, heads), the sizes RADIO's `args.model` uses.
_TIMM_VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_TIMM_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_\d+")


@dataclass(frozen=True)
class LlamaConfig:
    """The language model (`llm_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None: plain RoPE
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RadioConfig:
    """The C-RADIO vision tower (`vision_config`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    # the position table covers (max_img_size / patch_size)^2 patches
    max_img_size: int
    num_cls_tokens: int
    num_registers: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    norm_mean: tuple[float, float, float] = CLIP_MEAN
    norm_std: tuple[float, float, float] = CLIP_STD

    @property
    def num_summary_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def max_grid_size(self) -> int:
        return self.max_img_size // self.patch_size


@dataclass(frozen=True)
class NemotronVLConfig:
    """The whole VLM: tiles, pixel shuffle and projector around the two towers."""

    llm: LlamaConfig
    vision: RadioConfig
    # tile size in pixels (square)
    force_image_size: int
    patch_size: int
    downsample_ratio: float
    ps_version: str
    use_thumbnail: bool
    max_dynamic_patch: int
    vit_hidden_size: int
    projector_hidden_size: int
    torch_dtype: str | None

    @property
    def tokens_per_tile(self) -> int:
        grid = self.force_image_size // self.patch_size
        return int(grid * grid * self.downsample_ratio**2)


def _get(
    d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], prefix: str, default: Any = ...
) -> Any:
    """d[key] checked against `kind`; ModelLoadError naming `prefix + key` when missing or mistyped."""
    name = f"{prefix}{key}"
    if key not in d or d[key] is None:
        if default is ...:
            raise ModelLoadError(f"config.json: missing key {name!r}")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise ModelLoadError(f"config.json: key {name!r} must be {kind}, got {value!r}")
    if not isinstance(value, kinds):
        raise ModelLoadError(f"config.json: key {name!r} must be {kind}, got {value!r}")
    return value


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise ModelLoadError(f"config.json: key {name!r} must be positive, got {value}")
    return value


def parse_rope_scaling(raw: Any, prefix: str) -> Llama3RopeScaling | None:
    """`rope_scaling` (or transformers 5's `rope_parameters`) -> Llama3RopeScaling, None for plain RoPE."""
    name = f"{prefix}rope_scaling"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"config.json: key {name!r} must be an object or null")
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ModelLoadError(
            f"config.json: {name}.rope_type {rope_type!r} is not supported (llama3, default)"
        )
    p = f"{name}."
    return Llama3RopeScaling(
        factor=_get(raw, "factor", float, p),
        low_freq_factor=_get(raw, "low_freq_factor", float, p),
        high_freq_factor=_get(raw, "high_freq_factor", float, p),
        original_max_position_embeddings=_get(raw, "original_max_position_embeddings", int, p),
    )


def _eos_ids(raw: Any, name: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if isinstance(raw, int) and not isinstance(raw, bool):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(x, int) for x in raw):
        return tuple(raw)
    raise ModelLoadError(f"config.json: key {name!r} must be an int or a list of ints, got {raw!r}")


def parse_llama_config(d: Mapping[str, Any], prefix: str = "llm_config.") -> LlamaConfig:
    hidden = _positive(_get(d, "hidden_size", int, prefix), f"{prefix}hidden_size")
    heads = _positive(_get(d, "num_attention_heads", int, prefix), f"{prefix}num_attention_heads")
    kv_heads = _positive(_get(d, "num_key_value_heads", int, prefix, heads), f"{prefix}num_key_value_heads")
    if heads % kv_heads:
        raise ModelLoadError(
            f"config.json: {prefix}num_attention_heads must be a multiple of num_key_value_heads"
        )
    rope_raw = d.get("rope_scaling", d.get("rope_parameters"))
    rope_theta = d.get("rope_theta")
    if rope_theta is None and isinstance(d.get("rope_parameters"), Mapping):
        rope_theta = d["rope_parameters"].get("rope_theta")
    return LlamaConfig(
        vocab_size=_positive(_get(d, "vocab_size", int, prefix), f"{prefix}vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive(_get(d, "intermediate_size", int, prefix), f"{prefix}intermediate_size"),
        num_hidden_layers=_positive(_get(d, "num_hidden_layers", int, prefix), f"{prefix}num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_positive(_get(d, "head_dim", int, prefix, hidden // heads), f"{prefix}head_dim"),
        rms_norm_eps=_get(d, "rms_norm_eps", float, prefix, 1e-6),
        rope_theta=_get({"rope_theta": rope_theta}, "rope_theta", float, prefix, 10000.0),
        rope_scaling=parse_rope_scaling(rope_raw, prefix),
        max_position_embeddings=_get(d, "max_position_embeddings", int, prefix, 2048),
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, prefix, False),
        attention_bias=_get(d, "attention_bias", bool, prefix, False),
        mlp_bias=_get(d, "mlp_bias", bool, prefix, False),
        bos_token_id=_get(d, "bos_token_id", int, prefix, None),
        eos_token_ids=_eos_ids(d.get("eos_token_id"), f"{prefix}eos_token_id"),
    )


def _triple(d: Mapping[str, Any], key: str, prefix: str, default: tuple[float, float, float]) -> tuple:
    value = _get(d, key, list, prefix, list(default))
    if len(value) != 3 or not all(isinstance(x, int | float) for x in value):
        raise ModelLoadError(f"config.json: key {prefix}{key!r} must be a list of 3 numbers")
    return tuple(float(x) for x in value)


def parse_radio_config(d: Mapping[str, Any], prefix: str = "vision_config.") -> RadioConfig:
    """The plain form of docs/CHECKPOINT.md (see `parse_radio_args_config` for the Hub's `args` form)."""
    hidden = _positive(_get(d, "hidden_size", int, prefix), f"{prefix}hidden_size")
    if "intermediate_size" in d:
        intermediate = _positive(_get(d, "intermediate_size", int, prefix), f"{prefix}intermediate_size")
    else:
        intermediate = int(hidden * _get(d, "mlp_ratio", float, prefix, 4.0))
    heads = _positive(_get(d, "num_attention_heads", int, prefix), f"{prefix}num_attention_heads")
    if hidden % heads:
        raise ModelLoadError(f"config.json: {prefix}hidden_size must be a multiple of num_attention_heads")
    return RadioConfig(
        hidden_size=hidden,
        num_hidden_layers=_positive(_get(d, "num_hidden_layers", int, prefix), f"{prefix}num_hidden_layers"),
        num_attention_heads=heads,
        intermediate_size=intermediate,
        patch_size=_positive(_get(d, "patch_size", int, prefix), f"{prefix}patch_size"),
        max_img_size=_positive(_get(d, "max_img_size", int, prefix), f"{prefix}max_img_size"),
        num_cls_tokens=_get(d, "num_cls_tokens", int, prefix),
        num_registers=_get(d, "num_registers", int, prefix, 0),
        layer_norm_eps=_get(d, "layer_norm_eps", float, prefix, 1e-6),
        qkv_bias=_get(d, "qkv_bias", bool, prefix, True),
        norm_mean=_triple(d, "norm_mean", prefix, CLIP_MEAN),
        norm_std=_triple(d, "norm_std", prefix, CLIP_STD),
    )


def parse_radio_args_config(d: Mapping[str, Any], num_summary_tokens: int | None, prefix: str) -> RadioConfig:
    """The Hub's remote-code form: {"args": {"model": "vit_huge_patch16_224", "cpe_max_size": 2048, ...}}.

    Sizes come from the timm model name; the summary-token count from the shape of
    `cls_token.token` in the weights (passed in; only the total matters, so it is all counted as
    cls tokens); mean/std are read from the `input_conditioner` weights by the loader.
    """
    args = _get(d, "args", dict, prefix)
    model_name = _get(args, "model", str, f"{prefix}args.")
    match = _TIMM_NAME.fullmatch(model_name)
    if match is None:
        raise ModelLoadError(
            f"config.json: {prefix}args.model {model_name!r} is not a timm vit_<size>_patch<N>_<res>"
        )
    width, depth, heads = _TIMM_VIT_SIZES[match.group(1)]
    patch = int(d.get("patch_size") or match.group(2))
    max_size = args.get("cpe_max_size") or d.get("max_resolution")
    if not isinstance(max_size, int):
        raise ModelLoadError(
            f"config.json: missing key {prefix}args.cpe_max_size (or {prefix}max_resolution)"
        )
    if num_summary_tokens is None:
        raise ModelLoadError("config.json: the RADIO `args` form needs the cls_token.token weight shape")
    return RadioConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        patch_size=patch,
        max_img_size=max_size,
        num_cls_tokens=num_summary_tokens,
        num_registers=0,
        qkv_bias=bool(args.get("qkv_bias", True)),
    )


def parse_nemotron_vl_config(
    raw: Mapping[str, Any], *, num_summary_tokens: int | None = None
) -> NemotronVLConfig:
    """config.json dict -> NemotronVLConfig. `num_summary_tokens` (the first dim of
    `cls_token.token`) is needed only for the Hub's RADIO `args` form."""
    llm = parse_llama_config(_get(raw, "llm_config", dict, ""))
    vision_raw = _get(raw, "vision_config", dict, "")
    if "args" in vision_raw:
        vision = parse_radio_args_config(vision_raw, num_summary_tokens, "vision_config.")
    else:
        vision = parse_radio_config(vision_raw)
    ps_version = _get(raw, "ps_version", str, "", "v2")
    if ps_version not in ("v1", "v2"):
        raise ModelLoadError(f"config.json: key 'ps_version' must be 'v1' or 'v2', got {ps_version!r}")
    config = NemotronVLConfig(
        llm=llm,
        vision=vision,
        force_image_size=_positive(_get(raw, "force_image_size", int, ""), "force_image_size"),
        patch_size=_get(raw, "patch_size", int, "", vision.patch_size),
        downsample_ratio=_get(raw, "downsample_ratio", float, "", 0.5),
        ps_version=ps_version,
        use_thumbnail=_get(raw, "use_thumbnail", bool, "", True),
        max_dynamic_patch=_get(raw, "max_dynamic_patch", int, "", 12),
        vit_hidden_size=_get(raw, "vit_hidden_size", int, "", vision.hidden_size),
        projector_hidden_size=_get(raw, "projector_hidden_size", int, "", llm.hidden_size),
        torch_dtype=_get(raw, "torch_dtype", str, "", None),
    )
    _check_geometry(config)
    return config


def _check_geometry(config: NemotronVLConfig) -> None:
    if config.vit_hidden_size != config.vision.hidden_size:
        raise ModelLoadError("config.json: key 'vit_hidden_size' differs from vision_config.hidden_size")
    if config.patch_size != config.vision.patch_size:
        raise ModelLoadError("config.json: key 'patch_size' differs from vision_config.patch_size")
    grid = config.force_image_size // config.patch_size
    factor = 1 / config.downsample_ratio
    if config.force_image_size % config.patch_size or factor != int(factor) or grid % int(factor):
        raise ModelLoadError(
            "config.json: keys 'force_image_size', 'patch_size', 'downsample_ratio' must give a patch grid "
            "divisible by 1/downsample_ratio"
        )


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The SigLIP tower of Idefics3 / SmolVLM (`vision_config`, model_type idefics3_vision)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    # side of the square input the position table was trained for (512 for SmolVLM-256M)
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_channels: int = 3

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class Idefics3Config:
    """The whole Idefics3 VLM (SmolVLM checkpoints use this architecture)."""

    text: LlamaConfig
    vision: SiglipVisionConfig
    # pixel shuffle factor of the connector: scale_factor^2 patches become one token
    scale_factor: int
    image_token_id: int
    # top-level tie_word_embeddings (the text config's when absent): lm_head shares embed_tokens
    tie_word_embeddings: bool

    @property
    def tokens_per_tile(self) -> int:
        """<image> tokens per sub-image: (image_size / patch)^2 / scale_factor^2."""
        return self.vision.num_patches_per_side**2 // self.scale_factor**2


_VISION_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")


def parse_siglip_config(d: Mapping[str, Any], prefix: str = "vision_config.") -> SiglipVisionConfig:
    hidden = _positive(_get(d, "hidden_size", int, prefix, 1152), f"{prefix}hidden_size")
    heads = _positive(_get(d, "num_attention_heads", int, prefix, 16), f"{prefix}num_attention_heads")
    if hidden % heads:
        raise ModelLoadError(f"config.json: {prefix}hidden_size must be a multiple of num_attention_heads")
    hidden_act = _get(d, "hidden_act", str, prefix, "gelu_pytorch_tanh")
    if hidden_act not in _VISION_ACTIVATIONS:
        raise ModelLoadError(
            f"config.json: {prefix}hidden_act {hidden_act!r} is not supported "
            f"({', '.join(_VISION_ACTIVATIONS)})"
        )
    image_size = _positive(_get(d, "image_size", int, prefix, 224), f"{prefix}image_size")
    patch_size = _positive(_get(d, "patch_size", int, prefix, 32), f"{prefix}patch_size")
    if image_size % patch_size:
        raise ModelLoadError(f"config.json: {prefix}image_size must be a multiple of patch_size")
    return SiglipVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=_positive(
            _get(d, "num_hidden_layers", int, prefix, 12), f"{prefix}num_hidden_layers"
        ),
        num_attention_heads=heads,
        intermediate_size=_positive(
            _get(d, "intermediate_size", int, prefix, 3072), f"{prefix}intermediate_size"
        ),
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=_get(d, "layer_norm_eps", float, prefix, 1e-6),
        hidden_act=hidden_act,
        num_channels=_get(d, "num_channels", int, prefix, 3),
    )


def parse_idefics3_config(raw: Mapping[str, Any], *, num_summary_tokens: int | None = None) -> Idefics3Config:
    """config.json dict of an Idefics3ForConditionalGeneration checkpoint -> Idefics3Config.

    Defaults are transformers' Idefics3Config defaults. `num_summary_tokens` is unused (the
    registry passes it to every family's parser).
    """
    text = parse_llama_config(_get(raw, "text_config", dict, ""), prefix="text_config.")
    vision = parse_siglip_config(_get(raw, "vision_config", dict, ""))
    scale = _positive(_get(raw, "scale_factor", int, "", 2), "scale_factor")
    if vision.num_patches_per_side % scale:
        raise ModelLoadError(
            "config.json: vision_config.image_size / patch_size must be divisible by 'scale_factor'"
        )
    return Idefics3Config(
        text=text,
        vision=vision,
        scale_factor=scale,
        image_token_id=_get(raw, "image_token_id", int, "", 128257),
        tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, "", text.tie_word_embeddings),
    )
