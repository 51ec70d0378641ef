"""The runner's per-request state, and one step's flat batch built from it.

`CachedRequestState` is the runner's copy of a request (token ids, block table, images, sampling
settings), created from a NewRequestData and advanced by each step. `build_input_batch` turns the
SchedulerOutput plus those states into the step's tensors on the device: the flat token batch
(decodes first, then prefill chunks), slot_mapping, the attention metadata and logits_indices.
Rebuilt every step from Python lists (persistent tensors come with CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmserve.engine.outputs import SchedulerOutput
from vlmserve.layers.attention import PagedAttentionContext, PagedKVCache, PrefillSpan
from vlmserve.protocol.types import ImageInput, SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    """One request as the runner knows it; dropped when it finishes or is preempted."""

    request_id: str
    # prompt then output tokens; the last one may be a sampled token whose KV is not computed yet
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    # sorted by offset (SchedulerOutput.scheduled_encoder_inputs indexes into it)
    images: list[ImageInput]
    block_ids: list[int]
    # tokens whose KV is computed before the step under way
    num_computed_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass(frozen=True)
class InputBatch:
    """One step's inputs. Shape: T = total scheduled tokens, B = scheduled requests, N = requests
    sampled this step (those whose scheduled tokens reach their last token)."""

    # [B] in batch order: decodes first, then prefill chunks
    request_ids: list[str]
    # [B + 1]: request i's tokens are [query_start_loc[i], query_start_loc[i + 1]) of the batch
    query_start_loc: list[int]
    # [B]: tokens in context after this step (num_computed_tokens + num_scheduled_tokens)
    seq_lens: list[int]
    # [T] int64 on the device
    input_ids: torch.Tensor
    positions: torch.Tensor
    # [N] int64 on the device: the batch rows whose logits are sampled
    logits_indices: torch.Tensor
    # [N]: the request of each logits row
    sampled_request_ids: list[str]
    attention: PagedAttentionContext

    def query_start(self, request_id: str) -> int:
        return self.query_start_loc[self.request_ids.index(request_id)]


@dataclass(slots=True)
class _Lists:
    """The batch as Python lists while it is assembled."""

    request_ids: list[str] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    sampled_request_ids: list[str] = field(default_factory=list)

    def add(self, state: CachedRequestState, num_tokens: int, block_size: int) -> None:
        start, end = state.num_computed_tokens, state.num_computed_tokens + num_tokens
        if end > len(state.token_ids) or -(-end // block_size) > len(state.block_ids):
            raise RuntimeError(
                f"request {state.request_id}: tokens [{start}, {end}) scheduled, but it has "
                f"{len(state.token_ids)} tokens and {len(state.block_ids)} blocks"
            )
        self.request_ids.append(state.request_id)
        self.input_ids.extend(state.token_ids[start:end])
        self.positions.extend(range(start, end))
        blocks = state.block_ids
        self.slot_mapping.extend(
            blocks[p // block_size] * block_size + p % block_size for p in range(start, end)
        )
        self.query_start_loc.append(len(self.input_ids))
        self.seq_lens.append(end)
        if end == len(state.token_ids):  # the chunk reaches the request's last token: sample
            self.logits_indices.append(len(self.input_ids) - 1)
            self.sampled_request_ids.append(state.request_id)


def build_input_batch(
    scheduler_output: SchedulerOutput,
    states: dict[str, CachedRequestState],
    kv_cache: PagedKVCache,
    device: torch.device,
) -> InputBatch:
    """The step's flat batch over the scheduled requests (their states already updated)."""
    block_size = kv_cache.block_size
    scheduled = scheduler_output.num_scheduled_tokens
    # decodes (one token) first, so their rows form the prefix the batched decode attention reads
    order = sorted(scheduled, key=lambda request_id: scheduled[request_id] > 1)
    lists = _Lists()
    for request_id in order:
        lists.add(states[request_id], scheduled[request_id], block_size)
    num_decodes = sum(1 for request_id in order if scheduled[request_id] == 1)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    attention = PagedAttentionContext(
        kv_cache=kv_cache,
        slot_mapping=tensor(lists.slot_mapping),
        num_decodes=num_decodes,
        **_decode_metadata(
            [states[r] for r in order[:num_decodes]], lists.seq_lens[:num_decodes], block_size, kv_cache
        ),
        prefills=tuple(
            _prefill_span(states[order[i]], lists, i, block_size, device)
            for i in range(num_decodes, len(order))
        ),
    )
    return InputBatch(
        request_ids=lists.request_ids,
        query_start_loc=lists.query_start_loc,
        seq_lens=lists.seq_lens,
        input_ids=tensor(lists.input_ids),
        positions=tensor(lists.positions),
        logits_indices=tensor(lists.logits_indices),
        sampled_request_ids=lists.sampled_request_ids,
        attention=attention,
    )


# Several decodes whose contexts are all at most this long share one SDPA call over their gathered,
# padded blocks; otherwise each decode reads its own context in place. Per-request attention costs a
# few small ops per layer that the batch shares; the gather copies every context in every layer.
# Measured per layer on the 2-core CPU (docs/BENCHMARKS.md, 2026-11-23), 4 and 8 decodes: the batch
# is 1.2-2x faster up to ~160 tokens, in place 1.1x at 300, 1.6-1.8x at 600, 1.3-2x at 1142.
MAX_GATHERED_DECODE_LEN = 256


def _decode_metadata(
    states: list[CachedRequestState], seq_lens: list[int], block_size: int, kv_cache: PagedKVCache
) -> dict:
    """Either decode_segments (in place) or decode_block_table [B, max_blocks] (padded with block 0)
    with decode_mask [B, 1, 1, S]; see PagedAttentionContext."""
    if not states:
        return {"decode_block_table": None, "decode_mask": None}
    if len(states) == 1 or max(seq_lens) > MAX_GATHERED_DECODE_LEN:
        segments = tuple(
            context_segments(s.block_ids, n, block_size) for s, n in zip(states, seq_lens, strict=True)
        )
        return {"decode_block_table": None, "decode_mask": None, "decode_segments": segments}
    device = kv_cache.key_cache[0].device
    num_blocks = [-(-seq_len // block_size) for seq_len in seq_lens]
    max_blocks = max(num_blocks)
    table = [
        state.block_ids[:n] + [0] * (max_blocks - n) for state, n in zip(states, num_blocks, strict=True)
    ]
    slots = torch.arange(max_blocks * block_size, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    return {
        "decode_block_table": torch.tensor(table, dtype=torch.long, device=device).view(
            len(states), max_blocks
        ),
        "decode_mask": (slots[None, :] < lens[:, None]).view(len(states), 1, 1, max_blocks * block_size),
    }


def context_segments(block_ids: list[int], seq_len: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Positions [0, seq_len) of a request as runs of consecutive flat slots:
    ((first_slot, num_slots), ...) in position order, one run per stretch of consecutive blocks."""
    runs: list[list[int]] = []
    for block_id in block_ids[: -(-seq_len // block_size)]:
        if runs and runs[-1][0] + runs[-1][1] == block_id * block_size:
            runs[-1][1] += block_size
        else:
            runs.append([block_id * block_size, block_size])
    runs[-1][1] -= -seq_len % block_size  # the last block is full up to seq_len only
    return tuple((start, length) for start, length in runs)


def _prefill_span(
    state: CachedRequestState, lists: _Lists, index: int, block_size: int, device: torch.device
) -> PrefillSpan:
    query_start, query_end = lists.query_start_loc[index], lists.query_start_loc[index + 1]
    seq_len = lists.seq_lens[index]
    num_computed = seq_len - (query_end - query_start)
    mask = None
    if num_computed > 0:
        keys = torch.arange(seq_len, device=device)
        queries = torch.arange(num_computed, seq_len, device=device)
        mask = keys[None, :] <= queries[:, None]  # [q, seq_len]
    block_ids = state.block_ids[: -(-seq_len // block_size)]
    return PrefillSpan(
        query_start=query_start,
        query_end=query_end,
        num_computed_tokens=num_computed,
        block_ids=torch.tensor(block_ids, dtype=torch.long, device=device),
        mask=mask,
    )
