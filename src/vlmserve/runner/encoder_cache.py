"""The image-embedding cache: vision-encoder features of recent images, on the device, by content hash.

An LRU bounded in bytes, owned by the ModelRunner (it holds tensors). The key is
`ImageInput.content_hash`, which covers the decoded pixels and the preprocessing settings, so the
same image sent again (in another request, after another prefix) skips the vision encoder. The
prefix cache already skips it when the whole prompt up to the image matches; this cache covers the
rest (another system prompt, another question before the image). Engine thread only: no lock.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """`get` marks an entry most recently used; `put` evicts least recently used entries until the
    new one fits. An entry larger than the whole budget is not stored; max_bytes 0 stores nothing."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Stores features [num_tokens, hidden]; the caller must not write to them afterwards."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = features
        self.num_bytes += size
