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
from typing import Generic, Protocol, TypeVar

import torch

from vlmserve.lru import BytesLRU, tensor_bytes


class _Processed(Protocol):
    @property
    def pixel_values(self) -> torch.Tensor: ...


P = TypeVar("P", bound=_Processed)


def _size(image: _Processed) -> int:
    return tensor_bytes(image.pixel_values)


class ProcessedImageCache(Generic[P]):
    """A BytesLRU of processed images by `key(data, max_tiles)`, sized by their pixel_values, with a
    lock and hit/miss counts. max_bytes 0 stores nothing."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: BytesLRU[P] = BytesLRU(max_bytes, _size)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._lru.max_bytes > 0

    def key(self, data: bytes, max_tiles: int) -> str | None:
        """The cache key of an image file's bytes under a tile budget; None when the cache stores
        nothing (max_bytes 0), so that nobody hashes the bytes for a lookup that cannot hit."""
        return f"{hashlib.sha256(data).hexdigest()}|{max_tiles}" if self.enabled else None

    @property
    def num_bytes(self) -> int:
        return self._lru.num_bytes

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: str | None) -> P | None:
        """The image stored under key (None: the cache is off, a miss)."""
        with self._lock:
            image = self._lru.get(key) if key is not None else None
            if image is None:
                self.misses += 1
            else:
                self.hits += 1
            return image

    def put(self, key: str | None, image: P) -> None:
        """Stores a processed image; nobody may write to its pixel_values afterwards."""
        if key is None:
            return
        with self._lock:
            self._lru.put(key, image)
