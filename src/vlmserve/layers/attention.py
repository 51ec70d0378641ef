"""Causal self-attention over a KV cache, and the caches themselves.

This module is the only place that knows the cache layouts. Two live side by side, and
`cached_attention` dispatches on the `kv_cache` object the model passes through unchanged:
- `KVCache`: one sequence in a contiguous cache, slot p = position p (parity tests, warm-up).
- `PagedAttentionContext`: the engine's step over many requests: a `PagedKVCache` pool of blocks
  plus the step's metadata (slot_mapping, decode block tables, prefill spans), built by the runner.
The model code only builds `AttentionMetadata` once per forward and calls `cached_attention` in
each layer; it never sees requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Per-layer key/value tensors of one sequence.

    Shape: key_cache[i], value_cache[i]: [max_tokens, num_kv_heads, head_dim].
    Slot p holds the key/value of the token at position p; slots beyond the highest written
    position are garbage and never read.
    """

    key_cache: list[torch.Tensor]
    value_cache: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        max_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (max_tokens, num_kv_heads, head_dim)
        return cls(
            key_cache=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            value_cache=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_tokens(self) -> int:
        return self.key_cache[0].shape[0]


@dataclass(frozen=True)
class AttentionMetadata:
    """What every layer's attention needs for one forward over a contiguous `KVCache`, built once
    (one host sync, not one per layer). Empty for a `PagedAttentionContext`, which carries its own."""

    # [T] int64: the position of each token, which is also its cache slot
    positions: torch.Tensor
    # slots [0, num_slots) are read: up to the highest position in this forward (0 on the paged path)
    num_slots: int
    # [T, num_slots] bool, True = attend: slot s is visible to token t when s <= positions[t];
    # None on the paged path
    mask: torch.Tensor | None

    @classmethod
    def build(cls, positions: torch.Tensor, kv_cache: KVCache | PagedAttentionContext) -> AttentionMetadata:
        if isinstance(kv_cache, PagedAttentionContext):  # no host sync, no [T, S] mask per step
            return cls(positions=positions, num_slots=0, mask=None)
        num_slots = int(positions.max().item()) + 1
        slots = torch.arange(num_slots, device=positions.device)
        return cls(positions=positions, num_slots=num_slots, mask=slots[None, :] <= positions[:, None])


def store_kv(
    kv_cache: KVCache, layer_idx: int, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] of the tokens at `positions` [T] into their slots."""
    kv_cache.key_cache[layer_idx][positions] = key
    kv_cache.value_cache[layer_idx][positions] = value


def gather_kv(kv_cache: KVCache, layer_idx: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of slots [0, num_slots): each [num_slots, num_kv_heads, head_dim]."""
    return kv_cache.key_cache[layer_idx][:num_slots], kv_cache.value_cache[layer_idx][:num_slots]


def cached_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    metadata: AttentionMetadata,
    kv_cache: KVCache,
    layer_idx: int,
    scale: float,
) -> torch.Tensor:
    """Store this step's key/value, then attend each query causally over the cache.

    query [T, num_heads, head_dim]; key/value [T, num_kv_heads, head_dim]. Token t sees every cache
    slot <= its position (earlier chunks and itself). Returns [T, num_heads, head_dim].
    Grouped-query attention: num_heads is a multiple of num_kv_heads.
    With a PagedAttentionContext as `kv_cache`, `metadata` is unused (see `paged_attention`).
    """
    if isinstance(kv_cache, PagedAttentionContext):
        return paged_attention(query, key, value, kv_cache, layer_idx, scale)
    store_kv(kv_cache, layer_idx, key, value, metadata.positions)
    cached_key, cached_value = gather_kv(kv_cache, layer_idx, metadata.num_slots)  # [S, kv_heads, head_dim]
    if query.shape[0] == 1:  # one token: every slot up to its position is visible, no mask
        return grouped_decode_attention(query, cached_key[None], cached_value[None], scale)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],  # [1, num_heads, T, head_dim]: see _prefill_attention
        cached_key.transpose(0, 1)[None],  # [1, kv_heads, S, head_dim]
        cached_value.transpose(0, 1)[None],
        attn_mask=metadata.mask,
        scale=scale,
        enable_gqa=query.shape[1] != cached_key.shape[1],
    )[0]  # [num_heads, T, head_dim]
    return out.transpose(0, 1)


def grouped_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over keys/values read in place: query [B, num_heads, D],
    keys/values [B, S, kv_heads, D] (any strides: views of a cache; every slot visible)
    -> [B, num_heads, D].

    Grouped-query attention without expanding K/V: the query heads that share a KV head
    (head h reads KV head h // group, as HF's repeat_kv) become the rows of one matmul against
    that head's keys. For one query token on CPU, SDPA with `enable_gqa` or with K/V expanded
    by repeat_interleave took 650-1300 us a layer at 1142 tokens, this ~100 (docs/BENCHMARKS.md).
    Softmax in float32, as HF's eager attention.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    grouped = (query * scale).view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1))  # [B, kv_heads, group, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, kv_heads, group, D]
    return out.view(batch, num_heads, head_dim)


# Above this many runs a context is copied into one tensor (one copy of the context) rather than
# attended run by run (two small matmuls a run): per-op overhead beats the copy for fragmented tables.
MAX_IN_PLACE_SEGMENTS = 8


def segmented_decode_attention(
    query: torch.Tensor,
    key_slots: torch.Tensor,
    value_slots: torch.Tensor,
    segments: tuple[tuple[int, int], ...],
    scale: float,
) -> torch.Tensor:
    """One query token over a context stored as runs of consecutive slots, read in place:
    query [num_heads, D]; key_slots/value_slots [num_slots, kv_heads, D] (a layer's flat pool);
    segments ((first_slot, num_slots), ...) in position order -> [num_heads, D].

    The scores of all runs are concatenated before one softmax (they are small: [kv_heads, group,
    S]), so the result is the same as over one gathered context. A context in more than
    MAX_IN_PLACE_SEGMENTS runs is gathered into one tensor first.
    """
    if len(segments) > MAX_IN_PLACE_SEGMENTS:
        keys = torch.cat([key_slots[s : s + n] for s, n in segments])  # [S, kv_heads, D]
        values = torch.cat([value_slots[s : s + n] for s, n in segments])
        return grouped_decode_attention(query[None], keys[None], values[None], scale)[0]
    num_heads, head_dim = query.shape
    num_kv_heads = key_slots.shape[1]
    grouped = (query * scale).view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = [torch.matmul(grouped, key_slots[s : s + n].permute(1, 2, 0)) for s, n in segments]
    all_scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)  # [kv_heads, group, S]
    probs = torch.softmax(all_scores, dim=-1, dtype=torch.float32).to(value_slots.dtype)
    out, offset = None, 0
    for start, length in segments:  # [kv_heads, group, D] per run, summed
        part = torch.matmul(
            probs[..., offset : offset + length], value_slots[start : start + length].transpose(0, 1)
        )
        out = part if out is None else out + part
        offset += length
    assert out is not None, "a decode reads at least its own slot"
    return out.view(num_heads, head_dim)


# --- paged KV cache: many requests in one flat batch -------------------------------------------


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token's KV needs in every layer: enough to size and allocate a pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype) -> KVCacheSpec:
        """Read off the model's own contiguous cache, built on the meta device (allocates nothing)."""
        probe: KVCache = model.make_kv_cache(1, dtype=dtype, device="meta")  # type: ignore[operator]
        _, num_kv_heads, head_dim = probe.key_cache[0].shape
        return cls(len(probe.key_cache), num_kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        """Key and value of block_size tokens in every layer."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size


@dataclass
class PagedKVCache:
    """The engine's block pool on the device.

    Shape: key_cache[i], value_cache[i]: [num_blocks, block_size, num_kv_heads, head_dim]. The token
    at position p of a request lives in slot p % block_size of block block_table[p // block_size],
    flat slot block_id * block_size + p % block_size. Slots not yet written are read (masked out) by
    padded decode gathers, and garbage there could be NaN, which a mask does not stop: so the pool is
    allocated uninitialised (no memory is touched until used, and start-up does not pay for zeroing
    gigabytes) and each block is zeroed when the runner hands it to a request (`zero_blocks`);
    block 0, the gathers' padding, is zeroed at allocation.
    """

    key_cache: list[torch.Tensor]
    value_cache: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, spec: KVCacheSpec, num_blocks: int, block_size: int, *, device: torch.device | str
    ) -> PagedKVCache:
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        cache = cls(
            key_cache=[torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)],
            value_cache=[torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)],
        )
        cache.zero_blocks([0])
        return cache

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Clears blocks about to be written by a request (see the class docstring)."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.key_cache[0].device)
        for cache in (*self.key_cache, *self.value_cache):
            cache.index_fill_(0, index, 0)

    @property
    def num_blocks(self) -> int:
        return self.key_cache[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.key_cache[0].shape[1]


@dataclass(frozen=True)
class PrefillSpan:
    """One request's chunk of more than one token in the flat batch."""

    # the chunk is tokens [query_start, query_end) of the batch, positions
    # [num_computed_tokens, num_computed_tokens + query_end - query_start) of its request
    query_start: int
    query_end: int
    num_computed_tokens: int
    # [ceil(seq_len / block_size)] int64: the blocks of positions [0, seq_len), seq_len = chunk end
    block_ids: torch.Tensor
    # [num_query, seq_len] bool, True = attend: key j is visible to query i when
    # j <= num_computed_tokens + i. None when num_computed_tokens == 0 (plain causal over the chunk)
    mask: torch.Tensor | None

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + self.query_end - self.query_start


@dataclass(frozen=True)
class PagedAttentionContext:
    """The pool and one step's attention metadata, passed to the model as its `kv_cache`.

    The flat batch puts the decodes (one query token per request) first, tokens [0, num_decodes),
    then each prefill chunk. Built once per step by the runner (runner/input_batch.py).
    The decodes are read one of two ways, chosen by the runner: `decode_segments` (each request's
    context read in place as runs of consecutive slots: no copy, one small attention per request)
    or `decode_block_table` + `decode_mask` (every request's blocks gathered and padded to the
    longest: one batched SDPA for all, which wins only for short contexts: the copy grows with
    the context).
    Exactly one of the two is set when num_decodes > 0.
    """

    kv_cache: PagedKVCache
    # [T] int64: the flat slot each token's key/value is written to
    slot_mapping: torch.Tensor
    num_decodes: int
    # [num_decodes, max_num_blocks] int64, padded with block 0 (masked out)
    decode_block_table: torch.Tensor | None
    # [num_decodes, 1, 1, max_num_blocks * block_size] bool, True = attend (slot < seq_len)
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillSpan, ...]
    # per decode request, its context as ((first_flat_slot, num_slots), ...) in position order
    decode_segments: tuple[tuple[tuple[int, int], ...], ...] | None = None


def store_kv_paged(
    kv_cache: PagedKVCache, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into flat slots `slot_mapping` [T]."""
    num_kv_heads, head_dim = key.shape[1:]
    kv_cache.key_cache[layer_idx].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache.value_cache[layer_idx].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, D], block_ids [...] -> [..., block_size, kv_heads, D].

    Whole blocks, not slots: copying block_size rows at a time is several times faster on CPU."""
    return cache.index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, *cache.shape[1:])


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    context: PagedAttentionContext,
    layer_idx: int,
    scale: float,
) -> torch.Tensor:
    """Store the step's key/value in the pool, then attend each request over its own tokens.

    query [T, num_heads, head_dim]; key/value [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim].
    Decodes read their context in place (`decode_segments`, without expanding K/V per query head:
    `grouped_decode_attention`) or, several short ones, share one SDPA call over their block tables
    gathered and padded to the longest context (`decode_mask` hides the rest); each prefill chunk is
    one SDPA call, causal with its queries offset by the tokens computed before it.
    """
    store_kv_paged(context.kv_cache, layer_idx, key, value, context.slot_mapping)
    out = torch.empty_like(query)
    if context.num_decodes:
        out[: context.num_decodes] = _decode_attention(
            query[: context.num_decodes], context, layer_idx, scale
        )
    for span in context.prefills:
        rows = slice(span.query_start, span.query_end)
        out[rows] = _prefill_attention(query[rows], key[rows], value[rows], span, context, layer_idx, scale)
    return out


def _decode_attention(
    query: torch.Tensor, context: PagedAttentionContext, layer_idx: int, scale: float
) -> torch.Tensor:
    """query [B, num_heads, D], one token per request -> [B, num_heads, D]."""
    pool = context.kv_cache
    key_cache, value_cache = pool.key_cache[layer_idx], pool.value_cache[layer_idx]
    if context.decode_segments is not None:
        key_slots = key_cache.view(-1, *key_cache.shape[2:])  # [num_blocks * block_size, kv_heads, D]
        value_slots = value_cache.view(-1, *value_cache.shape[2:])
        if len(context.decode_segments) == 1:
            out = segmented_decode_attention(
                query[0], key_slots, value_slots, context.decode_segments[0], scale
            )
            return out[None]
        return torch.stack(
            [
                segmented_decode_attention(q, key_slots, value_slots, segments, scale)
                for q, segments in zip(query, context.decode_segments, strict=True)
            ]
        )
    assert context.decode_block_table is not None and context.decode_mask is not None, "no decode metadata"
    batch, num_heads, head_dim = query.shape
    keys = _gather_blocks(key_cache, context.decode_block_table)  # [B, nb, bs, kv_heads, D]
    values = _gather_blocks(value_cache, context.decode_block_table)
    num_kv_heads = keys.shape[-2]
    keys = keys.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, kv_heads, S, D]
    values = values.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    # SDPA, not grouped_decode_attention: on the padded batch SDPA's CPU kernel is 1.5x faster (the
    # matmul would copy the batch once more to merge its batch and head dimensions)
    out = F.scaled_dot_product_attention(
        query.view(batch, num_heads, 1, head_dim),
        keys,
        values,
        attn_mask=context.decode_mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, num_heads, 1, D]
    return out.view(batch, num_heads, head_dim)


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    span: PrefillSpan,
    context: PagedAttentionContext,
    layer_idx: int,
    scale: float,
) -> torch.Tensor:
    """One request's chunk: query [q, num_heads, D], its key/value [q, kv_heads, D] -> [q, num_heads, D]."""
    if span.mask is None:  # nothing computed before: the chunk attends to itself only
        keys, values = key, value
    else:  # earlier chunks or prefix-cache hits: read the whole context back from the pool
        pool = context.kv_cache
        num_kv_heads, head_dim = key.shape[1:]
        keys = _gather_blocks(pool.key_cache[layer_idx], span.block_ids).view(-1, num_kv_heads, head_dim)
        values = _gather_blocks(pool.value_cache[layer_idx], span.block_ids).view(-1, num_kv_heads, head_dim)
        keys, values = keys[: span.seq_len], values[: span.seq_len]
    # 4-D inputs: on CPU only those reach SDPA's flash kernel; 3-D ones take the math path (bmm, a
    # materialised mask, softmax), 5-7x slower for a 1142-token chunk (docs/BENCHMARKS.md)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],  # [1, num_heads, q, D]
        keys.transpose(0, 1)[None],  # [1, kv_heads, S, D]
        values.transpose(0, 1)[None],
        attn_mask=span.mask,
        is_causal=span.mask is None,
        scale=scale,
        enable_gqa=query.shape[1] != keys.shape[1],
    )[0]  # [num_heads, q, D]
    return out.transpose(0, 1)
