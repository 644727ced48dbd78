"""Punch coalescing: at most one punch event per pair within a window (registry/state.py)."""

from __future__ import annotations

from ..keys import Key
from ..protocol import pair_of


class Coalescer:
    """At most one punch per pair within `window_s`; `now` is monotonic seconds."""

    # Entries older than the window only matter until it passes; sweep when the table grows.
    _SWEEP_AT = 1024

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last: dict[tuple[Key, Key], float] = {}

    def admit(self, a: Key, b: Key, now: float) -> bool:
        """True if a punch for (a, b) should be pushed now (and records it)."""
        pair = pair_of(a, b)
        last = self._last.get(pair)
        if last is not None and now - last < self.window_s:
            return False
        self._last[pair] = now
        if len(self._last) > self._SWEEP_AT:
            self._last = {p: t for p, t in self._last.items() if now - t < self.window_s}
        return True

    def forget(self, a: Key, b: Key) -> None:
        """Let the next punch for (a, b) through, whatever the window says."""
        self._last.pop(pair_of(a, b), None)

    def partners(self, key: Key) -> list[Key]:
        """The keys `key` was punched with (within the window, or not yet swept)."""
        return [b if a == key else a for a, b in self._last if key in (a, b)]
