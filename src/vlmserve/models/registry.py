"""Supported architectures and `load_model`: config.json -> built model with its weights loaded.

Owns the map from config.json `architectures[0]` to the model family (model class, processor
class, config parser), all named by import path and imported lazily.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmserve.errors import ModelLoadError
from vlmserve.models.loader import load_weights, read_weight_shapes

# the first dim of this tensor is the summary-token count the Hub's RADIO `args` config lacks
_CLS_TOKEN = "vision_model.radio_model.model.patch_generator.cls_token.token"


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: "module:attribute" paths, imported only when used."""

    model: str
    processor: str
    parse_config: str

    def model_class(self) -> type[nn.Module]:
        return _import(self.model)

    def processor_class(self) -> type:
        return _import(self.processor)


ARCHITECTURES: dict[str, ModelFamily] = {
    "Llama_Nemotron_Nano_VL": ModelFamily(
        model="vlmserve.models.nemotron_vl:NemotronVLForConditionalGeneration",
        processor="vlmserve.inputs.nemotron_vl:NemotronVLProcessor",
        parse_config="vlmserve.models.config:parse_nemotron_vl_config",
    ),
    "Idefics3ForConditionalGeneration": ModelFamily(
        model="vlmserve.models.idefics3:Idefics3ForConditionalGeneration",
        processor="vlmserve.inputs.idefics3:Idefics3Processor",
        parse_config="vlmserve.models.config:parse_idefics3_config",
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: eval mode, no grads, weights loaded."""

    model: nn.Module
    # config.json as read
    raw_config: dict[str, Any]
    # the family's parsed config dataclass (NemotronVLConfig, Idefics3Config)
    config: Any
    family: ModelFamily


def _import(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object")
    return raw


def family_for(raw_config: dict[str, Any]) -> ModelFamily:
    """The family of config.json's `architectures[0]`; ModelLoadError listing the supported ones."""
    architectures = raw_config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"config.json: architecture {name!r} is not supported (supported: {supported})")
    return ARCHITECTURES[name]


def build_empty_model(
    model_class: type[nn.Module], config: Any, *, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Build on the meta device (no memory, no random init), then allocate uninitialised storage
    of `dtype` on `device`. Modules with derived, non-checkpoint state refill it in `reset_buffers`."""
    with torch.device("meta"):
        model = model_class(config)
    # the cast happens on meta tensors, so `to_empty` allocates `dtype` storage directly
    model = model.to(dtype=dtype).to_empty(device=device)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model


def load_model(
    model_dir: Path, *, dtype: torch.dtype, device: torch.device, progress: bool = True
) -> LoadedModel:
    """Read config.json, build the family's model empty with `dtype` on `device`, load its weights."""
    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    family = family_for(raw)
    shapes = read_weight_shapes(model_dir)
    num_summary = shapes[_CLS_TOKEN][0] if _CLS_TOKEN in shapes else None
    config = _import(family.parse_config)(raw, num_summary_tokens=num_summary)
    model = build_empty_model(family.model_class(), config, dtype=dtype, device=device)
    load_weights(model, model_dir, progress=progress)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, raw_config=raw, config=config, family=family)
