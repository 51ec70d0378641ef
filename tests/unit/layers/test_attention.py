"""Attention paths of layers/attention.py against a plain reference (K/V expanded per query head,
masked softmax): grouped decode over strided views, decodes read in place as runs of slots, the
gathered and padded decode batch, prefill chunks after earlier chunks, across block boundaries."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vlmserve.layers.attention import (
    MAX_IN_PLACE_SEGMENTS,
    AttentionMetadata,
    KVCache,
    KVCacheSpec,
    PagedAttentionContext,
    PagedKVCache,
    cached_attention,
    grouped_decode_attention,
    paged_attention,
    segmented_decode_attention,
)
from vlmserve.protocol.types import SamplingParams
from vlmserve.runner.input_batch import (
    MAX_GATHERED_DECODE_LEN,
    CachedRequestState,
    _decode_metadata,
    _Lists,
    _prefill_span,
    context_segments,
)

ATOL = 1e-5  # float32


def reference_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_position: int):
    """query [q, H, D] at positions first_position..; keys/values [S, kv, D] -> [q, H, D], causal."""
    num_heads, head_dim = query.shape[1:]
    group = num_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", query, keys) / math.sqrt(head_dim)
    positions = torch.arange(first_position, first_position + query.shape[0])
    visible = torch.arange(keys.shape[0])[None, :] <= positions[:, None]  # [q, S]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqs,shd->qhd", probs, values)


@pytest.mark.parametrize("num_kv_heads,group", [(1, 1), (3, 3), (2, 4), (4, 1)])
def test_grouped_decode_matches_reference_on_strided_views(num_kv_heads: int, group: int) -> None:
    torch.manual_seed(num_kv_heads * 10 + group)
    head_dim, seq_lens = 16, [1, 7, 33]
    pool_k = torch.randn(100, num_kv_heads, head_dim)  # views at an offset, rows strided by kv*D
    pool_v = torch.randn(100, num_kv_heads, head_dim)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim)
    for i, n in enumerate(seq_lens):
        out = grouped_decode_attention(
            query[i : i + 1], pool_k[None, 5 : 5 + n], pool_v[None, 5 : 5 + n], head_dim**-0.5
        )
        ref = reference_attention(query[i : i + 1], pool_k[5 : 5 + n], pool_v[5 : 5 + n], n - 1)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # a batch of equal contexts at different offsets of the pool
    keys = torch.stack([pool_k[5:38], pool_k[40:73]])  # [2, 33, kv, D]
    values = torch.stack([pool_v[5:38], pool_v[40:73]])
    out = grouped_decode_attention(query[:2], keys, values, head_dim**-0.5)
    for i in range(2):
        ref = reference_attention(query[i : i + 1], keys[i], values[i], 32)
        torch.testing.assert_close(out[i : i + 1], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "block_ids,seq_len,expected",
    [
        ([3], 1, ((12, 1),)),
        ([3, 4, 5], 12, ((12, 12),)),  # full blocks, one run
        ([3, 4, 5], 9, ((12, 9),)),  # the last block's first slot only
        ([3, 4, 9, 10, 2], 17, ((12, 8), (36, 8), (8, 1))),
        ([7, 6], 8, ((28, 4), (24, 4))),  # descending ids are two runs
        ([3, 4, 5, 6], 8, ((12, 8),)),  # blocks past seq_len are not read
    ],
)
def test_context_segments(block_ids: list[int], seq_len: int, expected: tuple) -> None:
    assert context_segments(block_ids, seq_len, 4) == expected


def test_segmented_decode_matches_reference() -> None:
    torch.manual_seed(1)
    num_kv_heads, group, head_dim = 3, 3, 16
    slots_k = torch.randn(64, num_kv_heads, head_dim)
    slots_v = torch.randn(64, num_kv_heads, head_dim)
    query = torch.randn(num_kv_heads * group, head_dim)
    fragmented = tuple((slot, 2) for slot in range(60, 0, -6))  # 10 runs: over MAX_IN_PLACE_SEGMENTS
    assert len(fragmented) > MAX_IN_PLACE_SEGMENTS
    for segments in [((5, 1),), ((0, 20),), ((40, 8), (4, 8), (60, 3)), ((10, 4), (14, 4)), fragmented]:
        index = torch.cat([torch.arange(s, s + n) for s, n in segments])
        ref = reference_attention(query[None], slots_k[index], slots_v[index], len(index) - 1)[0]
        out = segmented_decode_attention(query, slots_k, slots_v, segments, head_dim**-0.5)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_contiguous_cache_decode_and_chunked_prefill_match_reference() -> None:
    torch.manual_seed(2)
    num_kv_heads, group, head_dim, seq_len = 2, 3, 8, 23
    query = torch.randn(seq_len, num_kv_heads * group, head_dim)
    key = torch.randn(seq_len, num_kv_heads, head_dim)
    value = torch.randn(seq_len, num_kv_heads, head_dim)
    ref = reference_attention(query, key, value, 0)
    cache = KVCache.allocate(1, 32, num_kv_heads, head_dim, dtype=torch.float32, device="cpu")
    outs = []
    for start, end in [(0, 10), (10, 17), *[(p, p + 1) for p in range(17, seq_len)]]:  # chunks, then decodes
        positions = torch.arange(start, end)
        metadata = AttentionMetadata.build(positions, cache)
        outs.append(
            cached_attention(
                query[start:end], key[start:end], value[start:end], metadata, cache, 0, head_dim**-0.5
            )
        )
    torch.testing.assert_close(torch.cat(outs), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["one decode", "short decodes", "long decodes"])
@pytest.mark.parametrize("num_kv_heads,group", [(1, 4), (3, 3)])
def test_paged_mixed_batch_matches_reference(mode: str, num_kv_heads: int, group: int) -> None:
    """Decodes (seq_len at and around block boundaries) plus a prefill chunk after earlier chunks and
    a first chunk, with scattered and consecutive block tables, both decode read modes: in place
    (one decode, or contexts over MAX_GATHERED_DECODE_LEN) and gathered (several short ones)."""
    rng = random.Random(num_kv_heads)
    torch.manual_seed(num_kv_heads)
    block_size, head_dim = 4, 8
    spec = KVCacheSpec(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.float32)
    pool = PagedKVCache.allocate(spec, 256, block_size, device="cpu")
    for cache in (*pool.key_cache, *pool.value_cache):  # allocated uninitialised: garbage may be NaN
        cache[1:].fill_(float("nan"))
    free = list(range(1, 256))
    long = MAX_GATHERED_DECODE_LEN
    # (context before this step, tokens this step): decodes, then a later chunk and a first chunk
    shapes = {
        "one decode": [(8, 1), (9, 6), (0, 5)],
        "short decodes": [(3, 1), (4, 1), (7, 1), (0, 1), (9, 6), (0, 5)],
        "long decodes": [(long, 1), (3, 1), (long + 3, 1), (9, 6), (0, 5)],
    }[mode]
    states, contexts = [], []
    for i, (num_computed, num_new) in enumerate(shapes):
        total = num_computed + num_new
        num_blocks = -(-total // block_size)
        if i % 2:  # consecutive blocks
            start = free.index(next(b for b in free if all(b + k in free for k in range(num_blocks))))
            blocks = free[start : start + num_blocks]
        else:
            blocks = rng.sample(free, num_blocks)
        for b in blocks:
            free.remove(b)
        pool.zero_blocks(blocks)  # as the runner does when it hands blocks to a request
        states.append(
            CachedRequestState(f"r{i}", list(range(total)), total, SamplingParams(), [], blocks, num_computed)
        )
        contexts.append(
            (
                torch.randn(total, num_kv_heads * group, head_dim),
                torch.randn(total, num_kv_heads, head_dim),
                torch.randn(total, num_kv_heads, head_dim),
            )
        )
        # write the earlier context straight into the pool
        slots = torch.tensor(
            [blocks[p // block_size] * block_size + p % block_size for p in range(num_computed)],
            dtype=torch.long,
        )
        if num_computed:
            pool.key_cache[0].view(-1, num_kv_heads, head_dim)[slots] = contexts[-1][1][:num_computed]
            pool.value_cache[0].view(-1, num_kv_heads, head_dim)[slots] = contexts[-1][2][:num_computed]
    lists = _Lists()
    for state, (_, num_new) in zip(states, shapes, strict=True):
        lists.add(state, num_new, block_size)
    num_decodes = sum(1 for _, n in shapes if n == 1)
    decode = _decode_metadata(states[:num_decodes], lists.seq_lens[:num_decodes], block_size, pool)
    assert ("decode_segments" in decode) == (mode != "short decodes")
    context = PagedAttentionContext(
        kv_cache=pool,
        slot_mapping=torch.tensor(lists.slot_mapping),
        num_decodes=num_decodes,
        prefills=tuple(
            _prefill_span(states[i], lists, i, block_size, torch.device("cpu"))
            for i in range(num_decodes, len(states))
        ),
        **decode,
    )
    query = torch.cat([q[c : c + n] for (q, _, _), (c, n) in zip(contexts, shapes, strict=True)])
    key = torch.cat([k[c : c + n] for (_, k, _), (c, n) in zip(contexts, shapes, strict=True)])
    value = torch.cat([v[c : c + n] for (_, _, v), (c, n) in zip(contexts, shapes, strict=True)])
    out = paged_attention(query, key, value, context, 0, head_dim**-0.5)
    for i, ((q, k, v), (c, n)) in enumerate(zip(contexts, shapes, strict=True)):
        ref = reference_attention(q[c : c + n], k[: c + n], v[: c + n], c)
        rows_i = slice(lists.query_start_loc[i], lists.query_start_loc[i + 1])
        torch.testing.assert_close(out[rows_i], ref, atol=ATOL, rtol=0)
