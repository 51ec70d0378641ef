"""Safetensors checkpoint -> model parameters (docs/CHECKPOINT.md: one file or index + shards).

Owns reading weights: the file map, header shapes, strict name/shape checks, the checkpoint -> module
name mapping a model may declare (`WeightMapping`) and the copy with a dtype cast. Never uses
torch.load. Every failure is a ModelLoadError naming the file and tensor.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from vlmserve.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class RenameRule:
    """Checkpoint fragment <-> module fragment, where the text before it matches `scope`.

    With num_shards > 1 the checkpoint tensor is row block `shard` of `num_shards` equal blocks of the
    module's tensor (e.g. `self_attn.q_proj.` is block 0 of 3 of a fused `attn.qkv.`).
    """

    # regex the name must match just before the fragment, e.g. r"\.encoder\.layers\.\d+\."
    scope: str
    checkpoint: str
    model: str
    shard: int = 0
    num_shards: int = 1

    def _sub(self, name: str, old: str, new: str) -> str | None:
        renamed, count = re.subn(f"({self.scope}){re.escape(old)}", lambda m: m.group(1) + new, name, count=1)
        return renamed if count else None


@dataclass(frozen=True)
class WeightMapping:
    """How a model's module names differ from its checkpoint's: the first rule that applies renames.

    A model declares one as the class attribute `weight_mapping`; names no rule covers are identical.
    `to_checkpoint` is the inverse, for writing checkpoints in the original layout.
    """

    rules: tuple[RenameRule, ...]

    def to_model(self, name: str) -> tuple[str, int, int]:
        """Checkpoint name -> (module tensor name, shard, num_shards)."""
        for rule in self.rules:
            renamed = rule._sub(name, rule.checkpoint, rule.model)
            if renamed is not None:
                return renamed, rule.shard, rule.num_shards
        return name, 0, 1

    def to_checkpoint(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Module tensor name -> checkpoint (name, tensor) pairs; a packed tensor gives one per shard."""
        matches = [(rule, rule._sub(name, rule.model, rule.checkpoint)) for rule in self.rules]
        matches = [(rule, renamed) for rule, renamed in matches if renamed is not None]
        if not matches:
            return [(name, tensor)]
        blocks = tensor.chunk(matches[0][0].num_shards, dim=0)
        return [(renamed, blocks[rule.shard]) for rule, renamed in matches]


IDENTITY_MAPPING = WeightMapping(rules=())


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


# checkpoint name -> (module tensor name, shard, num_shards)
_Plan = dict[str, tuple[str, int, int]]


def _plan(
    model: nn.Module, targets: dict[str, torch.Tensor], files: dict[str, Path], model_dir: Path
) -> _Plan:
    """Where each checkpoint tensor goes; raises for unexpected or missing tensors.

    `ignored_checkpoint_keys` match checkpoint names, `optional_checkpoint_keys` module names.
    """
    mapping: WeightMapping = getattr(model, "weight_mapping", IDENTITY_MAPPING)
    ignored = getattr(model, "ignored_checkpoint_keys", ())
    optional = getattr(model, "optional_checkpoint_keys", ())
    plan = {name: mapping.to_model(name) for name in files}
    unexpected = [
        n for n, (target, _, _) in plan.items() if target not in targets and not _matches(n, ignored)
    ]
    if unexpected:
        name = sorted(unexpected)[0]
        raise ModelLoadError(
            f"{files[name]}: unexpected tensor {name!r} ({len(unexpected)} unexpected in all)"
        )
    shards_found: dict[str, int] = {}
    for target, _, _ in plan.values():
        shards_found[target] = shards_found.get(target, 0) + 1
    expected = {target: num_shards for target, _, num_shards in plan.values()}
    missing = [
        n for n in targets if shards_found.get(n, 0) < expected.get(n, 1) and not _matches(n, optional)
    ]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: checkpoint lacks tensor {sorted(missing)[0]!r} ({len(missing)} missing in all)"
        )
    return {name: entry for name, entry in plan.items() if entry[0] in targets}


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: Path, *, progress: bool = True) -> None:
    """Copy every checkpoint tensor into the parameter or persistent buffer of the same name, after
    the model's `weight_mapping` when it declares one (a packed tensor is filled shard by shard).

    Names must match exactly, except those the model declares in `ignored_checkpoint_keys`
    (checkpoint tensors it has no use for) and `optional_checkpoint_keys` (model tensors a
    checkpoint may omit). Shapes must match; dtypes are cast to the model's.
    """
    files = checkpoint_files(Path(model_dir))
    targets = model.state_dict(keep_vars=True)
    plan = _plan(model, targets, files, Path(model_dir))
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    with tqdm(total=len(plan), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path, file_names in sorted(by_file.items()):
            _load_file(path, file_names, plan, targets)
            bar.update(len(file_names))


def _load_file(path: Path, names: list[str], plan: _Plan, targets: dict[str, torch.Tensor]) -> None:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc
    with handle as f:
        for name in names:
            target_name, shard, num_shards = plan[name]
            target = targets[target_name]
            if num_shards > 1:
                target = target.chunk(num_shards, dim=0)[shard]  # a view: the copy lands in the fused tensor
            _copy_tensor(f, path, name, target)


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
