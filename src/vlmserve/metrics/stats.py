"""Plain dataclasses the engine fills each step. No prometheus here: exposition lives elsewhere.

Counters (`*_queries`, `*_hits`, `num_preemptions`) are deltas since the previous snapshot, so an
exporter adds them to its running totals; gauges (`num_*`, `kv_cache_usage`) are the current values.
"""

from __future__ import annotations

from dataclasses import dataclass


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
