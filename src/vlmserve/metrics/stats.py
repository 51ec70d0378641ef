"""Plain dataclasses the engine and the input pipeline fill. No prometheus here: exposition lives in
metrics/prometheus.py.

In SchedulerStats, counters (`*_queries`, `*_hits`, `num_preemptions`, `num_images_*`) are deltas
since the previous snapshot and gauges (`num_running`, `num_waiting`, `kv_cache_usage`) the current
values; EngineCore adds the deltas up in an `EngineTotals`. RequestStats describes one finished
request (AsyncEngine); ImageStats and EncoderStats are running totals kept by their owners.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


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
    # images scheduled for the vision encoder since the previous SchedulerStats (an embedding "miss")
    num_images_encoded: int = 0
    # images of admitted requests whose KV came whole from the prefix cache, so the encoder never ran
    # on them (an embedding "hit")
    num_images_cached: int = 0


@dataclass(slots=True)
class EngineTotals:
    """SchedulerStats' counters added up since the engine started (written by the engine thread only)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_images_encoded: int = 0
    num_images_cached: int = 0

    def add(self, stats: SchedulerStats) -> None:
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.num_preemptions += stats.num_preemptions
        self.num_images_encoded += stats.num_images_encoded
        self.num_images_cached += stats.num_images_cached


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


@dataclass(slots=True)
class EncoderStats:
    """Vision-encoder runs of the model runner, added up (written by the engine thread only)."""

    num_images: int = 0
    encoder_seconds: float = 0.0
