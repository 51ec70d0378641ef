"""Plain dataclasses the engine and the input pipeline fill. No prometheus here: exposition lives in
metrics/prometheus.py.

Per step: SchedulerStats (the scheduler's gauges, its counters as deltas) and EncoderStats (the
runner's vision encoder, carried in ModelRunnerOutput). EngineCore folds both into an EngineStats,
an immutable snapshot of gauges and counters-since-start replaced whole after each step, so another
thread reads a consistent copy and misses nothing between reads. RequestStats describes one ended
request (AsyncEngine); ImageStats is the input pipeline's running totals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups since the last snapshot, in tokens, counted once per admitted request."""

    # prompt tokens looked up (each admission, including a preempted request's re-admission)
    queries: int = 0
    # of those, tokens whose KV was found in the cache
    hits: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The scheduler's state after a step."""

    num_running: int = 0
    num_waiting: int = 0
    # fraction of KV blocks held by requests (0.0 to 1.0); cached blocks nobody holds count as free
    kv_cache_usage: float = 0.0
    # prefix-cache tokens looked up / found since the previous SchedulerStats
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # running requests preempted (KV freed, to be recomputed) since the previous SchedulerStats
    num_preemptions: int = 0
    # images of requests admitted since the previous SchedulerStats whose KV came whole from the
    # prefix cache, so the vision encoder never saw them
    num_images_cached: int = 0


@dataclass(frozen=True, slots=True)
class EncoderStats:
    """The runner's vision encoder in one step (in ModelRunnerOutput when the step had images)."""

    # images whose features came from the encoder cache
    num_cache_hits: int = 0
    # images run through the vision encoder (every image when the cache is off)
    num_cache_misses: int = 0
    # wall seconds in embed_images (on CUDA: until its kernels finished)
    encoder_seconds: float = 0.0
    # bytes of features the encoder cache holds after the step (a gauge)
    cache_bytes: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine after its latest step: gauges as of then, counters added up since the start.

    Immutable: EngineCore builds a new one per step (`add_step`) and swaps the reference, so a reader
    on another thread (`AsyncEngine.stats()`) always sees one consistent step.
    """

    # --- gauges
    num_running: int = 0
    num_waiting: int = 0
    # fraction of KV blocks held by requests (0.0 to 1.0)
    kv_cache_usage: float = 0.0
    # bytes of image features in the runner's encoder cache
    encoder_cache_bytes: int = 0
    # --- counters since the engine started
    # prompt tokens of requests that produced their first token (counted once, preemptions aside)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # prompt tokens looked up in / found in the prefix cache (each admission)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # images whose KV came whole from the prefix cache (the encoder cache was not even asked)
    num_images_cached: int = 0
    encoder_cache_hits: int = 0
    encoder_cache_misses: int = 0
    vision_encoder_seconds: float = 0.0

    def add_step(
        self,
        scheduler: SchedulerStats,
        encoder: EncoderStats | None,
        *,
        num_prompt_tokens: int = 0,
        num_generation_tokens: int = 0,
    ) -> EngineStats:
        """The snapshot after one more step (`encoder` None: no image that step, cache unchanged)."""
        encoder_fields: dict[str, Any] = {}
        if encoder is not None:
            encoder_fields = {
                "encoder_cache_bytes": encoder.cache_bytes,
                "encoder_cache_hits": self.encoder_cache_hits + encoder.num_cache_hits,
                "encoder_cache_misses": self.encoder_cache_misses + encoder.num_cache_misses,
                "vision_encoder_seconds": self.vision_encoder_seconds + encoder.encoder_seconds,
            }
        return replace(
            self,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.kv_cache_usage,
            num_prompt_tokens=self.num_prompt_tokens + num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens + num_generation_tokens,
            prefix_cache_queries=self.prefix_cache_queries + scheduler.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits + scheduler.prefix_cache_hits,
            num_preemptions=self.num_preemptions + scheduler.num_preemptions,
            num_images_cached=self.num_images_cached + scheduler.num_images_cached,
            **encoder_fields,
        )


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One engine request that ended, timed on the event loop with time.monotonic()."""

    request_id: str
    # "stop", "length", "abort" or "error"
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    arrival_time: float
    # when the first generated token reached the event loop; None if none did
    first_token_time: float | None
    finish_time: float

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between generated tokens after the first (None below two tokens)."""
        if self.first_token_time is None or self.num_generation_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generation_tokens - 1)


@dataclass(slots=True)
class ImageStats:
    """Images the input pipeline turned into tiles (fetch or decode, tiling), added up; thread-safe."""

    num_images: int = 0
    # wall seconds from the start of an image's load to its tiles, summed over images
    preprocess_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, seconds: float) -> None:
        with self._lock:
            self.num_images += 1
            self.preprocess_seconds += seconds
