"""Paged KV-cache bookkeeping: which fixed-size blocks each request owns, and the prefix cache.

Pure Python, no tensors: a block is an index into the runner's KV tensors ([num_blocks, block_size,
...] per layer); this module decides which indices a request writes, never what is in them.
`BlockPool` owns the blocks (ref counts, the LRU free queue, the hash -> block table);
`KVCacheManager` owns the per-request block tables and the prefix-cache lookups.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from vlmserve.engine.request import Request
from vlmserve.metrics.stats import PrefixCacheStats
from vlmserve.protocol.types import ImageInput

# sha256 digest of a full block's contents and of every block before it
BlockHash = bytes
# (image content_hash, block start - image offset): negative when the image starts inside the block
ExtraKey = tuple[str, int]

_ROOT_HASH = b""


def image_extra_keys(images: Sequence[ImageInput], start: int, end: int) -> tuple[ExtraKey, ...]:
    """The extra hash keys of the block of tokens [start, end): one per image overlapping it.

    Placeholder ids are the same for every image, so token ids alone would let two prompts that
    differ only in the image share KV; the image's content hash (and where the block sits in it)
    keeps them apart (vLLM `_gen_mm_extra_hash_keys`).
    """
    return tuple(
        (image.content_hash, start - image.offset)
        for image in images
        if image.offset < end and image.offset + image.length > start
    )


def hash_block(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: tuple[ExtraKey, ...]
) -> BlockHash:
    """Stable chained hash of one full block (not Python's hash(), which is salted per process)."""
    payload = pickle.dumps((parent_hash, tuple(token_ids), extra_keys), protocol=5)
    return hashlib.sha256(payload).digest()


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of block_size token slots. Compared by identity."""

    block_id: int
    # requests whose block table holds this block; 0 means it sits in the free queue
    ref_cnt: int = 0
    # the block's hash while it is in the prefix cache (full and computed), else None
    block_hash: BlockHash | None = None
    # neighbours in the free queue, None while the block is held
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """The blocks nobody holds, in eviction order: allocation takes from the front.

    Not a deque: a prefix-cache hit revives a free block from the middle of the queue, and
    deque.remove is O(n). A doubly linked list threaded through the blocks themselves, between two
    sentinels, makes popleft, remove, append and appendleft O(1) (vLLM `FreeKVCacheBlockQueue`).
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        assert prev_block is not None and next_block is not None, f"block {block.block_id} is not free"
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Puts `block` last in line for eviction."""
        assert self._tail.prev_free is not None
        self._link(block, self._tail.prev_free, self._tail)

    def appendleft(self, block: KVCacheBlock) -> None:
        """Puts `block` first in line for reuse (a block with nothing worth keeping)."""
        assert self._head.next_free is not None
        self._link(block, self._head, self._head.next_free)

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def _link(self, block: KVCacheBlock, prev_block: KVCacheBlock, next_block: KVCacheBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"block {block.block_id} is free"
        block.prev_free, block.next_free = prev_block, next_block
        prev_block.next_free = block
        next_block.prev_free = block
        self.num_free_blocks += 1


class BlockPool:
    """All num_blocks blocks: ref counts, the free queue and the prefix-cache table.

    Invariants: a block is in the free queue iff ref_cnt == 0; a block is in `cached_blocks` iff
    its block_hash is set, and it stays there while free (evictable) until it is handed out again.
    """

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached (evictable) ones included."""
        return self.free_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Takes num_blocks from the front of the free queue (evicting their cached contents), ref 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = [self.free_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            self._evict(block)
            block.ref_cnt = 1
        return blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference to prefix-cache hits, reviving free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops a reference to each block, in the order they should be evicted.

        A block nobody holds any more goes to the back of the free queue when it is cached (kept
        as long as possible: LRU) and to the front when it is not (nothing in it to reuse).
        """
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Registers a full, computed block under its hash (a no-op when the hash is taken already:
        two requests computed the same block at once, and the first one stays the cached copy)."""
        if block.block_hash is None and block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None


class KVCacheManager:
    """Per-request block tables over a BlockPool, with prefix caching when enabled.

    A request's block table covers its tokens in order: token at position p lives in slot
    p % block_size of block block_table[p // block_size]. Blocks are registered in the prefix cache
    only once computed (`cache_blocks`, called after the step), so a hit never reads KV that is
    still being written.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # how many leading blocks of each request are registered in the prefix cache
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached blocks nobody holds count as free)."""
        return 1.0 - self.block_pool.num_free_blocks / self.block_pool.num_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of `request` in full blocks, and its length in tokens.

        Never the whole request: at least its last token must be computed to get logits, so a hit
        covers at most num_tokens - 1 tokens. Takes no references (`allocate_slots` does).
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in self._block_hashes(request)[:max_num_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[int] | None:
        """Grows the request's block table to hold num_new_tokens more tokens; the new block ids.

        `new_computed_blocks` (from get_computed_blocks, first allocation only) join the table
        first and their tokens count as computed. Returns None, changing nothing, when the pool
        has too few free blocks.
        """
        blocks = self.req_to_blocks.get(request.request_id, [])
        assert not (blocks and new_computed_blocks), "prefix hits are only taken on the first allocation"
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_required = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(new_computed_blocks))
        num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            return None
        if request.request_id not in self.req_to_blocks:
            self._admit(request, new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        self.req_to_blocks[request.request_id].extend(new_blocks)
        return [block.block_id for block in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers the request's full blocks within its first num_computed_tokens in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = num_computed_tokens // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= start:
            return
        block_hashes = self._block_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        for index in range(start, num_full_blocks):
            self.block_pool.cache_block(blocks[index], block_hashes[index])
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Drops the request's references; its last block is evicted first (the prefix outlives it)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, [])]

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """The prefix-cache counters since the last call (then reset)."""
        stats, self.prefix_cache_stats = self.prefix_cache_stats, PrefixCacheStats()
        return stats

    def _admit(self, request: Request, new_computed_blocks: Sequence[KVCacheBlock]) -> None:
        self.block_pool.touch(new_computed_blocks)
        self.req_to_blocks[request.request_id] = list(new_computed_blocks)
        self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        if self.enable_prefix_caching:
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += len(new_computed_blocks) * self.block_size

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """The request's full-block hashes, extended to cover its current tokens."""
        block_hashes = request.block_hashes
        num_full_blocks = request.num_tokens // self.block_size
        if len(block_hashes) < num_full_blocks:
            token_ids = request.all_token_ids
            for index in range(len(block_hashes), num_full_blocks):
                start, end = index * self.block_size, (index + 1) * self.block_size
                parent_hash = block_hashes[-1] if block_hashes else _ROOT_HASH
                extra_keys = image_extra_keys(request.images, start, end)
                block_hashes.append(hash_block(parent_hash, token_ids[start:end], extra_keys))
        return block_hashes
