"""A log throttle: at most one line per key per period, counting what it held back.

Servers meet the same condition over and over (a device that stays unreadable, a stranger
that keeps knocking); one line per occurrence would drown the events that matter.

Below the registry, the node and natpunch (each server uses one), so none of them imports
another for it.
"""

from __future__ import annotations

from collections.abc import Hashable


class Throttle:
    """At most one line per key per `period_s`; with `max_lines`, also at most that many lines
    per period in all, so that a client that changes its key (a source address picked from a
    large prefix) cannot make the log grow with the number of keys it uses."""

    # Keys whose period is over carry no information; sweep them once the table grows.
    _SWEEP_AT = 4096

    def __init__(self, period_s: float, *, max_lines: int | None = None) -> None:
        self.period_s = period_s
        self.max_lines = max_lines
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}
        self._window_start = float("-inf")
        self._window_lines = 0
        self._over_budget = 0  # lines of any key held back by max_lines, not yet reported

    def allow(self, key: Hashable, now: float) -> int | None:
        """None if a line for `key` was logged less than a period ago, or `max_lines` lines
        were logged this period (this one is held back); otherwise the number of lines held
        back since the last one logged: this key's, plus any the line budget held back."""
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if self.max_lines is not None:
            if now - self._window_start >= self.period_s:
                self._window_start, self._window_lines = now, 0
            if self._window_lines >= self.max_lines:
                self._over_budget += 1
                return None
            self._window_lines += 1
        self._last[key] = now
        if len(self._last) > self._SWEEP_AT:
            self._sweep(now)
        over, self._over_budget = self._over_budget, 0
        return self._held.pop(key, 0) + over

    def reset(self, key: Hashable) -> int:
        """Forget `key` (the condition ended); returns how many lines were held back."""
        self._last.pop(key, None)
        return self._held.pop(key, 0)

    def _sweep(self, now: float) -> None:
        stale = [k for k, t in self._last.items() if now - t >= self.period_s]
        for key in stale:
            del self._last[key]
            self._held.pop(key, None)
