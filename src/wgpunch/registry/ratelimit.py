"""Token buckets, one per key (a caller): at most `burst` requests at once, refilled at
`per_s`. `take` refuses when the bucket is empty (the API answers 429); `reserve` borrows
from the future and says how long to wait (the API makes the request wait: pacing). Pure: the
clock is an argument, so tests step it."""

from __future__ import annotations

from collections.abc import Hashable


class RateLimiter:
    __slots__ = ("_buckets", "burst", "per_s")

    # A bucket left alone long enough is full again and need not be kept: sweep those once
    # the table grows past this (keys are callers, so a large mesh reaches it).
    _SWEEP_AT = 4096

    def __init__(self, burst: int, per_s: float) -> None:
        self.burst = burst
        self.per_s = per_s
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable, now: float) -> float:
        """Take a token for `key`: 0.0 if there was one, else the seconds until there is one
        (nothing is taken then, so refused requests cost the caller nothing)."""
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_s
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._SWEEP_AT:
            self._sweep(now)
        return 0.0

    def reserve(self, key: Hashable, now: float) -> float:
        """Take a token for `key`, borrowed from the future if none is left: the seconds to
        wait before using it (0.0: now). Waiting requests are bounded by whoever calls this
        (one per connection), and so is the debt."""
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.per_s) - 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._SWEEP_AT:
            self._sweep(now)
        return 0.0 if tokens >= 0.0 else -tokens / self.per_s

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.per_s
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= full_after]:
            del self._buckets[key]
