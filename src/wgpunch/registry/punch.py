"""Punch coordination rules, pure: who initiates, and when a repeat is coalesced.

WireGuard breaks no tie between two initiations that cross in flight: each side's incoming
initiation replaces its own pending one and neither response matches, so the pair waits out
the 5 s retry (tests/test_wg_device.py measured 5.07 s). One side must go first; both agree on
which by comparing the raw public key bytes.
"""

from __future__ import annotations

from ..keys import Key


def initiator(side: Key, other: Key, *, side_public: bool = False,
              other_public: bool = False) -> bool:
    """True when `side` is the one that sends the first initiation. `*_public`: the side has
    no NAT of its own (PeerRecord.public). Between a side without NAT and one behind a NAT,
    the NATed side sends: behind an endpoint-dependent ("symmetric") NAT, the mapping toward
    the peer is a new port that nobody can know beforehand, so an initiation *toward* that
    side never arrives, and only its own initiation (which the public side answers, roaming
    to its source) makes a path (measured in the lab's mixed-4, public b vs symmetric c, by
    the lower key alone: direct in 0 of 9 runs with b initiating, 17 of 17 with c). A side
    without NAT has nothing to open. Otherwise the lower key (bytes)."""
    if side_public != other_public:
        return other_public
    return side.raw < other.raw


def pair_of(a: Key, b: Key) -> tuple[Key, Key]:
    """The pair in one canonical order, so A→B and B→A are the same pair."""
    return (a, b) if a.raw < b.raw else (b, a)


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
