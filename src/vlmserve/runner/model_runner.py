"""Runs one engine step on the device: SchedulerOutput in, ModelRunnerOutput out.

Owns the model, the paged KV pool and the runner's per-request state (token ids, block tables,
seeded RNGs) and the encoder cache (image features by content hash). A step: update the states
from the SchedulerOutput -> build the flat batch (input_batch.py) -> embed tokens, take the features
of the images this step's chunks cover from the encoder cache or the vision encoder and write them
over the placeholder tokens -> one forward over all requests' tokens (linear layers see the whole
[T, hidden] batch; attention is per request over the pool) -> logits only at the rows that sample
-> the Sampler, all rows at once. Knows nothing of HTTP or the scheduler's queues: it trusts the
SchedulerOutput contract (engine/outputs.py) and checks it where cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from vlmserve.engine.outputs import EncoderSlice, ModelRunnerOutput, NewRequestData, SchedulerOutput
from vlmserve.errors import InvalidRequestError
from vlmserve.layers.attention import PagedKVCache
from vlmserve.metrics.stats import EncoderStats
from vlmserve.protocol.types import ImageInput
from vlmserve.runner.encoder_cache import EncoderCache
from vlmserve.runner.input_batch import CachedRequestState, InputBatch, build_input_batch
from vlmserve.runner.sampler import Sampler, SamplingMetadata, make_generator
from vlmserve.runner.structured_output import (
    GuideState,
    TokenizerInfo,
    allocate_bitmask,
    compile_guide,
    unpack_bitmask,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _HeldImage:
    """Features of one request image encoded slice by slice, until its prefill chunk takes them."""

    # features [tiles * tokens_per_tile, hidden] of each slice so far, in tile order
    parts: list[torch.Tensor] = field(default_factory=list)
    num_tiles: int = 0
    # the whole image's features once every tile is encoded (or the encoder cache had them)
    features: torch.Tensor | None = None


@dataclass(slots=True)
class _EncoderWork:
    """The vision encoder's work in the step under way, for its EncoderStats."""

    num_cache_hits: int = 0
    num_cache_misses: int = 0
    seconds: float = 0.0
    # request_id -> indices of images completed in this step (reported to the scheduler)
    completed: dict[str, list[int]] = field(default_factory=dict)


class ModelRunner:
    """`execute(scheduler_output)` computes one step for every scheduled request."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        *,
        device: torch.device,
        dtype: torch.dtype,
        encoder_cache_bytes: int = 0,
        tokenizer_info: TokenizerInfo | None = None,
    ) -> None:
        """encoder_cache_bytes: budget of the image-embedding cache (0: off, every image is encoded).
        tokenizer_info: what structured output compiles guides against (None: a guided request
        fails with an error)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler()
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        # the vision encoder's work in the step under way (None: no image in it)
        self.step_encoder_stats: EncoderStats | None = None
        self._encoder_work = _EncoderWork()
        # request_id -> image index -> features being encoded slice by slice, or encoded and not yet
        # taken by the image's prefill chunk (encoder budget); dropped with the request's state
        self.held_images: dict[str, dict[int, _HeldImage]] = {}
        self.requests: dict[str, CachedRequestState] = {}
        # outlive preemption (unlike `requests`), so a seeded request resumes its random stream
        # where it stopped instead of replaying it; dropped when the request finishes
        self.generators: dict[str, torch.Generator] = {}
        # structured output: each guided request's position in its guide; like `generators` it
        # outlives preemption (the guide has consumed the outputs the request resumes with)
        self.tokenizer_info = tokenizer_info
        self.guides: dict[str, GuideState] = {}
        self._guide_errors: dict[str, str] = {}

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One step: the sampled token (and logprob) of every request whose chunk reached its end."""
        batch, logits = self.compute_logits(scheduler_output)
        encoded = {rid: list(indices) for rid, indices in self._encoder_work.completed.items()}
        if batch is None:
            return ModelRunnerOutput(encoder_stats=self.step_encoder_stats, encoded_images=encoded)
        output = self.sample(batch, logits)
        return dataclasses.replace(output, encoded_images=encoded) if encoded else output

    @torch.inference_mode()
    def compute_logits(self, scheduler_output: SchedulerOutput) -> tuple[InputBatch | None, torch.Tensor]:
        """Updates the states and runs the model: the batch and logits [N, vocab] float32 of its
        sampled rows (batch None when nothing is scheduled)."""
        self._update_states(scheduler_output)
        self._encoder_work = _EncoderWork()
        for request_id, slices in scheduler_output.scheduled_encoder_slices.items():
            for encoder_slice in slices:
                self._encode_slice(request_id, encoder_slice)
        if scheduler_output.total_num_scheduled_tokens == 0:
            self.step_encoder_stats = self._make_encoder_stats()
            return None, torch.empty(0)
        batch = build_input_batch(scheduler_output, self.requests, self.kv_cache, self.device)
        embeds = self._embed(batch, scheduler_output)
        self.step_encoder_stats = self._make_encoder_stats()
        hidden = self.model(embeds, batch.positions, batch.attention)  # [T, hidden]
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += num_tokens
        return batch, self.model.compute_logits(hidden[batch.logits_indices])

    # --- state -----------------------------------------------------------------------------------
    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_request_ids:
            self.requests.pop(request_id, None)
            self.generators.pop(request_id, None)
            self.guides.pop(request_id, None)
            self._guide_errors.pop(request_id, None)
            self.held_images.pop(request_id, None)
        for request_id in scheduler_output.preempted_request_ids:
            self.requests.pop(request_id, None)
            self.held_images.pop(request_id, None)
        for new in scheduler_output.scheduled_new_requests:
            self.requests[new.request_id] = self._new_state(new)
            # blocks past the prefix-cache hit are fresh: clear them before they are written
            self.kv_cache.zero_blocks(new.block_ids[new.num_computed_tokens // self.kv_cache.block_size :])
        for running in scheduler_output.scheduled_running_requests:
            state = self.requests[running.request_id]
            state.block_ids.extend(running.new_block_ids)
            state.num_computed_tokens = running.num_computed_tokens
            self.kv_cache.zero_blocks(list(running.new_block_ids))

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        if new.request_id not in self.generators:
            self.generators[new.request_id] = make_generator(new.sampling_params.seed, self.device)
        if new.sampling_params.guided is not None and new.request_id not in self.guides:
            self._start_guide(new)
        return CachedRequestState(
            request_id=new.request_id,
            token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            sampling_params=new.sampling_params,
            images=list(new.images),
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
        )

    # --- inputs ----------------------------------------------------------------------------------
    def _embed(self, batch: InputBatch, scheduler_output: SchedulerOutput) -> torch.Tensor:
        """Token embeddings [T, hidden], with the features of this step's images over their tokens."""
        embeds = self.model.embed_tokens(batch.input_ids)
        for request_id, image_indices in scheduler_output.scheduled_encoder_inputs.items():
            state = self.requests[request_id]
            chunk_start = batch.query_start(request_id)
            for index in image_indices:
                image = state.images[index]
                row = chunk_start + image.offset - state.num_computed_tokens
                if image.offset < state.num_computed_tokens or image.offset + image.length > (
                    state.num_computed_tokens + scheduler_output.num_scheduled_tokens[request_id]
                ):
                    raise RuntimeError(f"request {request_id}: image {index} is split across chunks")
                features = self._take_features(request_id, index, image)
                if features.shape[0] != image.num_embeds:
                    raise RuntimeError(
                        f"request {request_id}: image {index} has {image.num_embeds} image tokens "
                        f"but the vision encoder gave {features.shape[0]} features"
                    )
                _write_features(embeds, row, image, features.to(embeds.dtype))
        return embeds

    def _take_features(self, request_id: str, index: int, image: ImageInput) -> torch.Tensor:
        """One image's features [num_embeds, hidden] for its prefill chunk: those encoded slice by
        slice in earlier steps, else the encoder cache's, else the vision encoder's on all its tiles
        at once (then cached)."""
        held = self.held_images.get(request_id, {}).pop(index, None)
        if held is not None and held.features is not None:
            return held.features
        features = self.encoder_cache.get(image.content_hash)
        if features is not None:
            self._encoder_work.num_cache_hits += 1
            return features
        features = self._run_encoder(image.pixel_values)
        self._encoder_work.num_cache_misses += 1
        self.encoder_cache.put(image.content_hash, features)
        return features

    def _start_guide(self, new: NewRequestData) -> None:
        """The request's guide in its start state (the front end compiled the spec already, so this
        is a cache hit). A spec that does not compile here fails the request, not the step."""
        spec = new.sampling_params.guided
        assert spec is not None
        if self.tokenizer_info is None:
            self._guide_errors[new.request_id] = "this engine has no tokenizer for structured output"
            return
        try:
            self.guides[new.request_id] = compile_guide(spec, self.tokenizer_info).new_state()
        except InvalidRequestError as e:
            self._guide_errors[new.request_id] = e.message

    def _encode_slice(self, request_id: str, encoder_slice: EncoderSlice) -> None:
        """Runs the vision encoder on one slice of an image's tiles and holds the features; on the
        last slice (or an encoder-cache hit on the first) the image is complete."""
        index, image = encoder_slice.image_index, encoder_slice.image
        held_images = self.held_images.setdefault(request_id, {})
        held = held_images.get(index)
        if held is None or encoder_slice.tile_start == 0:
            held = held_images[index] = _HeldImage()
        if held.features is not None:
            return
        if held.num_tiles != encoder_slice.tile_start:
            raise RuntimeError(
                f"request {request_id}: image {index} slice starts at tile {encoder_slice.tile_start}, "
                f"but {held.num_tiles} tiles are encoded"
            )
        cached = self.encoder_cache.get(image.content_hash) if held.num_tiles == 0 else None
        if cached is not None:
            held.features = cached
            self._encoder_work.num_cache_hits += 1
        else:
            pixels = image.pixel_values[encoder_slice.tile_start : encoder_slice.tile_end]
            held.parts.append(self._run_encoder(pixels))
            held.num_tiles = encoder_slice.tile_end
            if held.num_tiles < image.num_tiles:
                return
            held.features = held.parts[0] if len(held.parts) == 1 else torch.cat(held.parts)
            held.parts = []
            self._encoder_work.num_cache_misses += 1
            self.encoder_cache.put(image.content_hash, held.features)
        self._encoder_work.completed.setdefault(request_id, []).append(index)

    def _run_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder on tiles [n, 3, S, S] -> features [n * tokens_per_tile, hidden]; its time
        goes to the step's encoder work (on CUDA waiting for the kernels)."""
        started = time.perf_counter()
        features = self.model.embed_images(pixel_values.to(device=self.device, dtype=self.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._encoder_work.seconds += time.perf_counter() - started
        return features

    def _make_encoder_stats(self) -> EncoderStats | None:
        work = self._encoder_work
        if not (work.num_cache_hits or work.num_cache_misses or work.seconds):
            return None
        return EncoderStats(
            num_cache_hits=work.num_cache_hits,
            num_cache_misses=work.num_cache_misses,
            encoder_seconds=work.seconds,
            cache_bytes=self.encoder_cache.num_bytes,
        )

    # --- outputs ---------------------------------------------------------------------------------
    def sample(self, batch: InputBatch, logits: torch.Tensor) -> ModelRunnerOutput:
        """Samples all logits rows at once, each with its request's settings, RNG and guide, and
        appends the token to the request's state."""
        states = [self.requests[request_id] for request_id in batch.sampled_request_ids]
        guided = [
            (row, self.guides.get(state.request_id))
            for row, state in enumerate(states)
            if state.sampling_params.guided is not None
        ]
        metadata = SamplingMetadata(
            params=[state.sampling_params for state in states],
            output_token_ids=[state.output_token_ids for state in states],
            generators=[self.generators[state.request_id] for state in states],
            allowed_token_mask=self._allowed_token_mask(guided, len(states), logits),
        )
        output = ModelRunnerOutput(encoder_stats=self.step_encoder_stats)
        results = self.sampler.sample(logits, metadata)
        for state, result in zip(states, results, strict=True):
            state.token_ids.append(result.token_id)
            output.sampled_token_ids[state.request_id] = result.token_id
            if result.logprob is not None:
                output.logprobs[state.request_id] = result.logprob
        for row, guide in guided:
            request_id = states[row].request_id
            if guide is None:
                output.guide_errors[request_id] = self._guide_errors.get(request_id, "no guide")
            elif not guide.accept(results[row].token_id):
                output.guide_errors[request_id] = guide.error or "the sampled token breaks the guide"
            elif guide.is_terminated():
                output.guides_finished.add(request_id)
        return output

    def _allowed_token_mask(
        self, guided: list[tuple[int, GuideState | None]], num_rows: int, logits: torch.Tensor
    ) -> torch.Tensor | None:
        """bool [num_rows, vocab] on the logits' device: each guided row's next allowed tokens, all
        tokens in the other rows (ids past the tokenizer never); None when no row has a guide.
        Filled on the CPU as a packed bitmask (4 bytes per 32 tokens), moved once, unpacked there."""
        if self.tokenizer_info is None or all(guide is None for _, guide in guided):
            return None
        bitmask = allocate_bitmask(num_rows, self.tokenizer_info.vocab_size)
        for row, guide in guided:
            if guide is not None:
                guide.fill_mask(bitmask[row])
        return unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One tiny forward so the first request does not pay for lazy initialisation (a contiguous
        cache: the pool is left untouched)."""
        cache = self.model.make_kv_cache(4, dtype=self.dtype, device=self.device)
        ids = torch.zeros(2, dtype=torch.long, device=self.device)
        hidden = self.model(self.model.embed_tokens(ids), torch.arange(2, device=self.device), cache)
        self.model.compute_logits(hidden[-1:])


def _write_features(embeds: torch.Tensor, row: int, image: ImageInput, features: torch.Tensor) -> None:
    """Writes features [num_embeds, hidden] over the image's embedding positions, its span starting at
    batch row `row` (runs of embed_runs, or the whole span)."""
    if not image.embed_runs:
        embeds[row : row + image.length] = features
        return
    used = 0
    for start, count in image.embed_runs:
        embeds[row + start : row + start + count] = features[used : used + count]
        used += count
