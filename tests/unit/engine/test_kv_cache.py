"""BlockPool / KVCacheManager: block accounting, the O(1) LRU free queue, image-aware prefix caching."""

from __future__ import annotations

import pytest

from vlmserve.engine import kv_cache
from vlmserve.engine.kv_cache import (
    FreeBlockQueue,
    KVCacheBlock,
    KVCacheManager,
    hash_block,
    image_extra_keys,
)
from vlmserve.engine.request import Request
from vlmserve.protocol.types import EngineRequest, ImageInput, SamplingParams

BLOCK_SIZE = 4
IMAGE_TOKEN = 99


def make_request(
    request_id: str, token_ids: list[int], images: tuple[ImageInput, ...] = (), max_tokens: int = 8
) -> Request:
    engine_request = EngineRequest(
        request_id=request_id,
        prompt_token_ids=token_ids,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        images=list(images),
    )
    return Request.from_engine_request(engine_request, max_model_len=4096)


def make_image(content_hash: str, offset: int, length: int) -> ImageInput:
    return ImageInput(pixel_values=None, num_tiles=1, content_hash=content_hash, offset=offset, length=length)


def image_prompt(content_hash: str) -> tuple[list[int], tuple[ImageInput, ...]]:
    """2 text tokens, 8 image tokens, 6 text tokens: 16 tokens, the image spans blocks 0..2."""
    token_ids = [1, 2] + [IMAGE_TOKEN] * 8 + [3, 4, 5, 6, 7, 8]
    return token_ids, (make_image(content_hash, offset=2, length=8),)


def make_manager(num_blocks: int = 16, *, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=caching)


def run_prefill(manager: KVCacheManager, request: Request) -> int:
    """Admits `request` the way the scheduler does, computes its whole prompt; the cache-hit tokens."""
    blocks, num_hit_tokens = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit_tokens, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return num_hit_tokens


def free_ids(manager: KVCacheManager) -> list[int]:
    return [block.block_id for block in manager.block_pool.free_queue]


# --- the free queue --------------------------------------------------------------------------------
def test_free_queue_removes_from_the_middle_and_keeps_order() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    queue.appendleft(blocks[0])
    assert [b.block_id for b in queue] == [0, 1, 3, 4, 2]
    assert queue.num_free_blocks == 5


def test_free_queue_is_not_a_deque() -> None:
    """Removal must be O(1): the links live on the blocks, not in a container that is searched."""
    assert not hasattr(FreeBlockQueue, "__getitem__")
    queue = FreeBlockQueue([KVCacheBlock(0)])
    with pytest.raises(IndexError):
        queue.popleft()
        queue.popleft()


# --- allocation and accounting ---------------------------------------------------------------------
def test_allocate_and_free_return_every_block() -> None:
    manager = make_manager(num_blocks=8, caching=False)
    request = make_request("a", list(range(10)))
    assert manager.allocate_slots(request, 10) == [0, 1, 2]
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2) == []  # slots 10, 11 fit in block 2
    request.num_computed_tokens = 12
    assert manager.allocate_slots(request, 1) == [3]
    assert manager.num_free_blocks == 4
    assert manager.usage == pytest.approx(0.5)
    manager.free(request)
    assert manager.num_free_blocks == 8
    assert manager.usage == 0.0


def test_allocate_returns_none_and_changes_nothing_when_short() -> None:
    manager = make_manager(num_blocks=2, caching=False)
    request = make_request("a", list(range(9)))
    assert manager.allocate_slots(request, 9) is None
    assert manager.num_free_blocks == 2
    assert manager.get_block_ids("a") == []
    assert "a" not in manager.req_to_blocks


# --- hashing -----------------------------------------------------------------------------------------
def test_block_hash_is_stable_and_chained() -> None:
    first = hash_block(b"", [1, 2, 3, 4], ())
    assert first == hash_block(b"", [1, 2, 3, 4], ())
    assert first != hash_block(b"x", [1, 2, 3, 4], ())  # a different parent
    assert first != hash_block(b"", [1, 2, 3, 4], (("img", 0),))
    assert len(first) == 32


def test_image_extra_keys_name_every_image_overlapping_the_block() -> None:
    _, images = image_prompt("cat")
    assert image_extra_keys(images, 0, 4) == (("cat", -2),)  # the image starts 2 tokens into the block
    assert image_extra_keys(images, 4, 8) == (("cat", 2),)
    assert image_extra_keys(images, 8, 12) == (("cat", 6),)
    assert image_extra_keys(images, 12, 16) == ()


# --- prefix caching ----------------------------------------------------------------------------------
def test_shared_prefix_hits_and_shares_blocks() -> None:
    manager = make_manager()
    first = make_request("a", list(range(10)))
    run_prefill(manager, first)
    second = make_request("b", [*range(8), 50, 51, 52])
    assert run_prefill(manager, second) == 8
    shared = manager.req_to_blocks["a"][:2]
    assert manager.req_to_blocks["b"][:2] == shared
    assert [block.ref_cnt for block in shared] == [2, 2]
    stats = manager.make_prefix_cache_stats()
    assert (stats.queries, stats.hits) == (21, 8)
    assert manager.make_prefix_cache_stats().queries == 0  # reset by the snapshot


def test_hit_never_covers_the_whole_prompt() -> None:
    manager = make_manager()
    run_prefill(manager, make_request("a", list(range(8))))
    blocks, num_hit_tokens = manager.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit_tokens == 4  # not 8: the last token must be computed for logits
    assert len(blocks) == 1


def test_caching_disabled_never_hits() -> None:
    manager = make_manager(caching=False)
    run_prefill(manager, make_request("a", list(range(10))))
    assert manager.get_computed_blocks(make_request("b", list(range(10)))) == ([], 0)


def test_freed_cached_block_stays_evictable_and_is_revived_on_a_hit() -> None:
    manager = make_manager(num_blocks=4)
    first = make_request("a", list(range(9)))
    run_prefill(manager, first)
    cached = manager.req_to_blocks["a"][:2]
    manager.free(first)
    assert manager.num_free_blocks == 4  # cached blocks count as free
    assert all(block.ref_cnt == 0 and block.block_hash is not None for block in cached)
    second = make_request("b", list(range(9)))
    assert run_prefill(manager, second) == 8
    assert manager.req_to_blocks["b"][:2] == cached
    assert [block.ref_cnt for block in cached] == [1, 1]
    assert manager.num_free_blocks == 1
    manager.free(second)
    assert manager.num_free_blocks == 4


def test_lru_eviction_takes_the_least_recently_freed_tail_first() -> None:
    manager = make_manager(num_blocks=4)
    old, new = make_request("old", list(range(8))), make_request("new", list(range(100, 108)))
    run_prefill(manager, old)  # two full blocks, both cached
    run_prefill(manager, new)
    manager.free(old)
    manager.free(new)
    assert manager.allocate_slots(make_request("x", [7] * 4), 4) is not None  # evicts one block
    assert manager.get_computed_blocks(make_request("o", [*range(8), 0]))[1] == 4  # old lost its tail
    assert manager.get_computed_blocks(make_request("n", [*range(100, 108), 0]))[1] == 8


def test_lru_order_in_the_free_queue() -> None:
    manager = make_manager(num_blocks=6)
    old, new = make_request("old", [*range(8), 0]), make_request("new", [*range(100, 108), 0])
    run_prefill(manager, old)
    run_prefill(manager, new)
    old_ids, new_ids = manager.get_block_ids("old"), manager.get_block_ids("new")
    manager.free(old)
    manager.free(new)
    # partial (uncached) blocks go to the front; cached ones in LRU order, each request tail first
    assert free_ids(manager) == [new_ids[2], old_ids[2], old_ids[1], old_ids[0], new_ids[1], new_ids[0]]


def test_same_blocks_computed_twice_at_once_are_freed_cleanly() -> None:
    manager = make_manager(num_blocks=8)
    first, second = make_request("a", list(range(9))), make_request("b", list(range(9)))
    for request in (first, second):  # both admitted before either's blocks are cached
        assert manager.allocate_slots(request, 9) is not None
    for request in (first, second):
        request.num_computed_tokens = 9
        manager.cache_blocks(request, 9)
    assert len(manager.block_pool.cached_blocks) == 2  # the first copy stays the cached one
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 8


# --- images in the key --------------------------------------------------------------------------------
def test_same_tokens_different_image_never_hit() -> None:
    manager = make_manager()
    run_prefill(manager, make_request("cat", *image_prompt("cat-hash")))
    token_ids, dog_images = image_prompt("dog-hash")
    # block 0 holds image tokens too, so not even the first block may be shared
    assert manager.get_computed_blocks(make_request("dog", token_ids, dog_images)) == ([], 0)
    _, num_hit_tokens = manager.get_computed_blocks(make_request("cat2", *image_prompt("cat-hash")))
    assert num_hit_tokens == 12  # the same image hits (all but the last block: never the whole prompt)


def test_token_only_hashing_would_hit_across_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails with token-only keys: with no extra keys the other image does hit."""
    monkeypatch.setattr(kv_cache, "image_extra_keys", lambda images, start, end: ())
    manager = make_manager()
    run_prefill(manager, make_request("cat", *image_prompt("cat-hash")))
    _, num_hit_tokens = manager.get_computed_blocks(make_request("dog", *image_prompt("dog-hash")))
    assert num_hit_tokens == 12


def test_text_before_the_image_still_hits() -> None:
    manager = make_manager()
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    run_prefill(manager, make_request("a", prefix + [IMAGE_TOKEN] * 4 + [9], (make_image("x", 8, 4),)))
    other = make_request("b", prefix + [IMAGE_TOKEN] * 4 + [9], (make_image("y", 8, 4),))
    assert manager.get_computed_blocks(other)[1] == 8  # the two text blocks, not the image block
