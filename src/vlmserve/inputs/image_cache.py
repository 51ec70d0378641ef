"""The front end's cache of processed images: the same encoded image sent again skips decoding and tiling.

A chat about a picture sends the picture again with every turn. The engine already skips the vision
encoder for it (the prefix cache, the encoder cache), but decoding the file and cutting it into
normalised tiles ran again each time: for a 512 x 512 PNG cut into 17 SmolVLM sub-images about
0.4 s of CPU before the request could start (docs/BENCHMARKS.md). Keyed by the sha256 of the encoded
bytes and the tile budget (the processor's settings are fixed for the server's life), so a hit is the
same pixels the processor would produce. Only successes are stored. An LRU bounded in bytes of
pixel_values; shared by the worker threads that process images, so it holds a lock.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

import torch


class _Processed(Protocol):
    @property
    def pixel_values(self) -> torch.Tensor: ...


P = TypeVar("P", bound=_Processed)


class ProcessedImageCache(Generic[P]):
    """`get`/`put` by `key(data, max_tiles)`; least recently used entries go first when a new one needs
    room. An entry larger than the whole budget is not stored; max_bytes 0 stores nothing."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, P] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: bytes, max_tiles: int) -> str:
        return f"{hashlib.sha256(data).hexdigest()}|{max_tiles}"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> P | None:
        with self._lock:
            image = self._entries.get(key)
            if image is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return image

    def put(self, key: str, image: P) -> None:
        """Stores a processed image; nobody may write to its pixel_values afterwards."""
        size = _size(image)
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            while self.num_bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.num_bytes -= _size(evicted)
            self._entries[key] = image
            self.num_bytes += size


def _size(image: _Processed) -> int:
    pixels = image.pixel_values
    return pixels.numel() * pixels.element_size()
