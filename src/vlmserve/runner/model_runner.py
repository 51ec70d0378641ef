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

import logging
import time

import torch

from vlmserve.engine.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
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
        if batch is None:
            return ModelRunnerOutput.make_empty()
        return self.sample(batch, logits)

    @torch.inference_mode()
    def compute_logits(self, scheduler_output: SchedulerOutput) -> tuple[InputBatch | None, torch.Tensor]:
        """Updates the states and runs the model: the batch and logits [N, vocab] float32 of its
        sampled rows (batch None when nothing is scheduled)."""
        self._update_states(scheduler_output)
        self.step_encoder_stats = None
        if scheduler_output.total_num_scheduled_tokens == 0:
            return None, torch.empty(0)
        batch = build_input_batch(scheduler_output, self.requests, self.kv_cache, self.device)
        embeds = self._embed(batch, scheduler_output)
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
        for request_id in scheduler_output.preempted_request_ids:
            self.requests.pop(request_id, None)
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
        """Token embeddings [T, hidden], with the features of this step's images over their tokens
        (sets step_encoder_stats when there are images)."""
        embeds = self.model.embed_tokens(batch.input_ids)
        if not scheduler_output.scheduled_encoder_inputs:
            return embeds
        encoder_seconds: list[float] = []  # one entry per image encoded; cache hits add none
        num_images = 0
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
                features = self._image_features(image, encoder_seconds)
                num_images += 1
                if features.shape[0] != image.length:
                    raise RuntimeError(
                        f"request {request_id}: image {index} has {image.length} placeholder tokens "
                        f"but the vision encoder gave {features.shape[0]} features"
                    )
                embeds[row : row + image.length] = features.to(embeds.dtype)
        self.step_encoder_stats = EncoderStats(
            num_cache_hits=num_images - len(encoder_seconds),
            num_cache_misses=len(encoder_seconds),
            encoder_seconds=sum(encoder_seconds),
            cache_bytes=self.encoder_cache.num_bytes,
        )
        return embeds

    def _image_features(self, image: ImageInput, encoder_seconds: list[float]) -> torch.Tensor:
        """One image's features [length, hidden]: from the encoder cache, else from the vision encoder
        (then cached; its time appended to encoder_seconds, on CUDA waiting for the kernels)."""
        features = self.encoder_cache.get(image.content_hash)
        if features is not None:
            return features
        started = time.perf_counter()
        features = self.model.embed_images(image.pixel_values.to(device=self.device, dtype=self.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        encoder_seconds.append(time.perf_counter() - started)
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
