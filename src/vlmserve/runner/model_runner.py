"""Runs the model for one request step: builds inputs, runs the vision encoder for a request's
images when its prefill starts, merges image features at their placeholder positions, runs the
language model over the request's KV cache in chunks, and samples.

This is the one place that touches tensors for a request. The continuous-batching engine replaces
the contiguous per-request cache with a paged one here, behind the same `execute` contract.
"""

from __future__ import annotations

import logging

import torch

from vlmserve.engine.request import Request
from vlmserve.runner.sampler import Sampler, SampleResult

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the device and the sampler; `execute(request)` computes one new token."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_prefill_chunk: int = 512,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        # prefill runs in chunks so attention scores stay [heads, chunk, context], not [heads, T, T]
        self.max_prefill_chunk = max_prefill_chunk
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, request: Request) -> SampleResult:
        """Computes KV for every token of `request` not yet computed and samples the next token."""
        if request.kv_cache is None:
            request.kv_cache = self.model.make_kv_cache(
                request.max_num_tokens, dtype=self.dtype, device=self.device
            )
        start = request.num_computed_tokens
        token_ids = request.all_token_ids[start:]
        embeds = self._embed(request, token_ids, start)
        hidden = None
        for chunk_start in range(0, len(token_ids), self.max_prefill_chunk):
            chunk = slice(chunk_start, chunk_start + self.max_prefill_chunk)
            positions = torch.arange(
                start + chunk.start, start + min(chunk.stop, len(token_ids)), device=self.device
            )
            hidden = self.model(embeds[chunk], positions, request.kv_cache)
        assert hidden is not None
        request.num_computed_tokens = request.num_tokens
        logits = self.model.compute_logits(hidden[-1:])[0]  # [vocab]
        return self.sampler.sample(
            logits, request.engine_request.sampling_params, request.output_token_ids, request.generator
        )

    def free(self, request: Request) -> None:
        request.kv_cache = None

    def _embed(self, request: Request, token_ids: list[int], start: int) -> torch.Tensor:
        """Token embeddings for positions start.. with image features placed over their tokens."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        embeds = self.model.embed_tokens(ids)  # [T, hidden]
        end = start + len(token_ids)
        for image in request.engine_request.images:
            if image.offset + image.length <= start or image.offset >= end:
                continue
            # The whole prompt is computed in one execute() call, so an image is never split.
            features = self.model.embed_images(
                image.pixel_values.to(device=self.device, dtype=self.dtype)
            )  # [num_tiles * tokens_per_tile, hidden]
            if features.shape[0] != image.length:
                raise RuntimeError(
                    f"image at offset {image.offset} has {image.length} placeholder tokens "
                    f"but the vision encoder gave {features.shape[0]} features"
                )
            lo = image.offset - start
            embeds[lo : lo + image.length] = features.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One tiny forward so the first request does not pay for lazy initialisation."""
        cache = self.model.make_kv_cache(4, dtype=self.dtype, device=self.device)
        ids = torch.zeros(2, dtype=torch.long, device=self.device)
        hidden = self.model(self.model.embed_tokens(ids), torch.arange(2, device=self.device), cache)
        self.model.compute_logits(hidden[-1:])
