"""Safetensors checkpoint -> model parameters (docs/CHECKPOINT.md: one file or index + shards).

Owns reading weights: the file map, header shapes, strict name/shape checks and the copy with a
dtype cast. Never uses torch.load. Every failure is a ModelLoadError naming the file and tensor.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from vlmserve.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Weight name -> the safetensors file holding it, from the index or the single file's header."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        return _files_from_index(index_path)
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise ModelLoadError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")
    return dict.fromkeys(_header_shapes(single), single)


def _files_from_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index_path}: not a safetensors index with a weight_map ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index_path}: weight_map must be an object")
    files = {name: index_path.parent / str(file) for name, file in weight_map.items()}
    for name, path in files.items():
        if not path.is_file():
            raise ModelLoadError(f"{path}: shard file missing (listed in {INDEX_FILE} for tensor {name!r})")
    return files


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc


def read_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape, from headers only (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = checkpoint_files(model_dir)
    for path in sorted(set(files.values())):
        shapes.update(_header_shapes(path))
    return shapes


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_names(
    model: nn.Module, targets: dict[str, torch.Tensor], files: dict[str, Path], model_dir: Path
) -> list[str]:
    """The checkpoint names to load; raises for unexpected or missing tensors."""
    ignored = getattr(model, "ignored_checkpoint_keys", ())
    optional = getattr(model, "optional_checkpoint_keys", ())
    unexpected = [n for n in files if n not in targets and not _matches(n, ignored)]
    if unexpected:
        name = sorted(unexpected)[0]
        raise ModelLoadError(
            f"{files[name]}: unexpected tensor {name!r} ({len(unexpected)} unexpected in all)"
        )
    missing = [n for n in targets if n not in files and not _matches(n, optional)]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: checkpoint lacks tensor {sorted(missing)[0]!r} ({len(missing)} missing in all)"
        )
    return [n for n in files if n in targets]


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: Path, *, progress: bool = True) -> None:
    """Copy every checkpoint tensor into the parameter or persistent buffer of the same name.

    Names must match exactly, except those the model declares in `ignored_checkpoint_keys`
    (checkpoint tensors it has no use for) and `optional_checkpoint_keys` (model tensors a
    checkpoint may omit). Shapes must match; dtypes are cast to the model's.
    """
    files = checkpoint_files(Path(model_dir))
    targets = model.state_dict(keep_vars=True)
    names = _check_names(model, targets, files, Path(model_dir))
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    with tqdm(total=len(names), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path, file_names in sorted(by_file.items()):
            _load_file(path, file_names, targets)
            bar.update(len(file_names))


def _load_file(path: Path, names: list[str], targets: dict[str, torch.Tensor]) -> None:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc
    with handle as f:
        for name in names:
            _copy_tensor(f, path, name, targets[name])


def _copy_tensor(f, path: Path, name: str, target: torch.Tensor) -> None:
    try:
        shape = tuple(f.get_slice(name).get_shape())
        tensor = f.get_tensor(name) if shape == tuple(target.shape) else None
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({exc})") from exc
    if tensor is None:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {list(shape)}, the model expects {list(target.shape)}"
        )
    target.copy_(tensor)
