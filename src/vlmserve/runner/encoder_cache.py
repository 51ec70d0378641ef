"""The image-embedding cache: vision-encoder features of recent images, on the device, by content hash.

An LRU bounded in bytes, owned by the ModelRunner (it holds tensors). The key is
`ImageInput.content_hash`, which covers the decoded pixels and the preprocessing settings, so the
same image sent again (in another request, after another prefix) skips the vision encoder. The
prefix cache already skips it when the whole prompt up to the image matches; this cache covers the
rest (another system prompt, another question before the image). Engine thread only: no lock.
"""

from __future__ import annotations

import torch

from vlmserve.lru import BytesLRU, tensor_bytes


class EncoderCache(BytesLRU[torch.Tensor]):
    """Features [num_tokens, hidden] by content hash (see BytesLRU for get/put and eviction)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, tensor_bytes)
