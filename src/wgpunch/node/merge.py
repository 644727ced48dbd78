"""How the records several registries hold of one peer become the one the agent goes by
(node/registries.py; DESIGN.md §11: newest observation first). Pure: no clock, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..protocol import PeerRecord


@dataclass(frozen=True, slots=True)
class Heard:
    """One registry's record of a peer, as this node holds it."""

    record: PeerRecord
    following: bool  # that registry's watch stream is up now
    changed_at: float  # when (our monotonic clock) that registry last told us something new


def newest(heard: Iterable[Heard]) -> PeerRecord | None:
    """The record of a peer the agent goes by, from what each registry says about it.

    The rule: a record with an endpoint beats one without (a registry that has not observed
    the peer, one restarted on a device that has not heard from it yet, says nothing of where
    it is); then a registry whose stream is up beats one that is not (what a registry that
    went away said is kept, but only while no live one observes the peer); then the observation
    heard last wins, by our own clock (the order the streams delivered it: each registry's
    records change only when its interface observes something new, and a snapshot that
    repeats a record unchanged does not make it newer); then the later handshake the
    registry's interface saw (the clocks of two registries are compared only there, to break
    a tie). A winner without the peer's report borrows the report of the best record that
    has one: the report says what the peer is (its addresses, NAT, that it follows punch
    events), whichever registry carried it."""
    ranked = sorted(heard, key=_rank, reverse=True)
    if not ranked:
        return None
    best = ranked[0].record
    if best.reported is None:
        reported = next((h.record.reported for h in ranked if h.record.reported is not None),
                        None)
        best = replace(best, reported=reported)
    return best


def _rank(heard: Heard) -> tuple[bool, bool, float, float]:
    handshake = heard.record.latest_handshake
    return (heard.record.endpoint is not None, heard.following, heard.changed_at,
            -math.inf if handshake is None else handshake)


def same(a: PeerRecord | None, b: PeerRecord | None) -> bool:
    """Whether two records say the same, whatever revision each registry gave them."""
    if a is None or b is None:
        return a is b
    return replace(a, revision=0) == replace(b, revision=0)
