import pytest
import torch

from vlmserve.runner.encoder_cache import EncoderCache


def features(num_tokens: int) -> torch.Tensor:
    return torch.zeros(num_tokens, 4)  # 16 bytes per token


def test_lru_evicts_least_recently_used_until_the_new_entry_fits() -> None:
    cache = EncoderCache(max_bytes=3 * 64)
    for key in "abc":
        cache.put(key, features(4))
    assert cache.num_bytes == 192 and len(cache) == 3
    assert cache.get("a") is not None  # a is now the most recently used: b goes first
    cache.put("d", features(8))  # 128 bytes: b and c go
    assert [key in cache for key in "abcd"] == [True, False, False, True]
    assert cache.num_bytes == 192


def test_too_large_entries_and_a_zero_budget_store_nothing() -> None:
    cache = EncoderCache(max_bytes=100)
    cache.put("big", features(8))
    assert "big" not in cache and cache.num_bytes == 0
    off = EncoderCache(0)
    off.put("a", features(1))
    assert off.get("a") is None and off.num_bytes == 0
    with pytest.raises(ValueError):
        EncoderCache(-1)


def test_putting_a_key_again_keeps_one_entry() -> None:
    cache = EncoderCache(max_bytes=1000)
    cache.put("a", features(2))
    cache.put("a", features(2))
    assert len(cache) == 1 and cache.num_bytes == 32
