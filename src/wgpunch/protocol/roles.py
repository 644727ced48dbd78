"""Who initiates a punch: the one rule, decided by the registry and carried in its punch events
(`PunchEvent.initiator`); modes without a registry that coordinates (DNS-SD, natpunch) and a
node that has had no punch event for a peer yet call the same function.

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
