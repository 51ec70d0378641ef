"""A least-recently-used map bounded by the bytes of its values: the encoder cache (runner) and the
processed-image cache (inputs) are both one of these. Not thread-safe: a user shared by threads locks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BytesLRU(Generic[V]):
    """`get` marks an entry most recently used; `put` evicts least recently used entries until the
    new one fits. An entry larger than the whole budget is not stored; max_bytes 0 stores nothing."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._size_of = size_of
        self._entries: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        """Stores value; the caller must not change it afterwards (its size is counted once)."""
        size = self._size_of(value)
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= self._size_of(evicted)
        self._entries[key] = value
        self.num_bytes += size
