"""Which peers a reconcile pass leaves out: those whose pass would decide and do what their
last one did (issue 18: with 100 idle peers, most of an idle agent's CPU went into deciding
every second, for each peer, that nothing had changed).

A peer *settles* after a pass that left everything it reads of the peer as it found it (its
memory, path and reason, its relay lease: a fixpoint) and decided to leave it alone for a
reason that lasts: a live session (`Reason.LIVE`, `ROAMED`) or no endpoint to try
(`NO_ENDPOINT`). The pass is a function of what it reads (`Quiet.inputs`) and of the time, so
a later pass with the same inputs reaches the same fixpoint as long as the time crosses no
bound the pass compares it with (`horizon`); such a pass is left out. Anything else, an
event for the peer included (a punch, an opener's word, a direct switch, a new role), makes
a full pass.

The bounds, where a quiet decision can turn with time alone:
- a live session by its handshake (decide.path_is_dead, and the `live` of natidle's
  keepalive rule) ends `session_live_s` after the handshake (wall clock);
- while it is live, silence kills the path `silence_dead_s` after the last byte heard, and
  a stall (we sent after the peer's last byte) begins `stall_s` after it (Memory.stalled);
- a path that is dead stays dead: the handshake only ages, the silence only grows.
The relay slots and the upgrade probes keep clocks of their own; a peer they hold one for
(`Relays.settled`, `Upgrades.settled`) does not settle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from ..keys import Key
from ..protocol import PeerRecord
from ..wg.model import PeerState
from .decide import Decision, Kind, Memory, Reason
from .natidle import IdleWatch
from .relay import Relays
from .timings import Timings
from .track import Track
from .upgrade import Upgrades
from .view import RegistryView

# Decisions to leave a peer alone that hold until its inputs change or a bound passes.
LASTING = frozenset({Reason.LIVE, Reason.ROAMED, Reason.NO_ENDPOINT})


@dataclass(frozen=True, slots=True)
class Settled:
    """A peer's inputs at the pass that settled it, and the times within which a pass with
    the same inputs would settle it again (monotonic and wall clock: `since` to `until`)."""

    inputs: tuple[object, ...]
    since: float
    since_wall: float
    until: float
    until_wall: float

    def holds(self, inputs: tuple[object, ...], now: float, now_wall: float) -> bool:
        # A clock that went back (the wall clock, stepped) could make an old handshake young.
        return (self.since <= now < self.until and self.since_wall <= now_wall < self.until_wall
                and inputs == self.inputs)


def horizon(peer: PeerState, mem: Memory, now_wall: float, t: Timings) -> tuple[float, float]:
    """Until when (monotonic, wall) the time alone changes nothing the pass decides about
    `peer` (the module doc lists the bounds)."""
    if peer.latest_handshake is None or not peer.has_live_session(now_wall, t.session_live_s):
        return math.inf, math.inf
    until = math.inf
    if mem.rx_changed_at is not None:
        until = mem.rx_changed_at + t.silence_dead_s
        if mem.tx_changed_at is not None and mem.tx_changed_at > mem.rx_changed_at:
            until = min(until, mem.rx_changed_at + t.stall_s)
    return until, peer.latest_handshake + t.session_live_s


class Quiet:
    """The agent's view of what a peer's pass reads, besides the device and the clock."""

    def __init__(self, view: RegistryView, relays: Relays, upgrades: Upgrades, idle: IdleWatch,
                 t: Timings, can_open: Callable[[], bool]) -> None:
        self.view = view
        self.relays = relays
        self.upgrades = upgrades
        self.idle = idle
        self.t = t
        self.can_open = can_open  # whether the agent sends raw openers (decide's can_open)
        self._common: tuple[object, ...] = ()

    def due(self, peers: Iterable[PeerState], tracks: dict[Key, Track], skip: Collection[Key],
            now: float, now_wall: float
            ) -> Iterator[tuple[PeerState, PeerRecord, Track, tuple[object, ...] | None]]:
        """The peers a pass goes through, one at a time as it gets to them: those the
        registry knows, but those in `skip` (the registries) and the settled ones; each with
        its track (a new one for a new peer) and what its pass reads (`settle` takes it)."""
        for peer in peers:
            known = self.view.peers.get(peer.public_key)
            if peer.public_key in skip or known is None:
                continue
            track = tracks.setdefault(peer.public_key, Track())
            inputs = self.inputs(peer, known, track)
            if (inputs is None or track.settled is None
                    or not track.settled.holds(inputs, now, now_wall)):
                yield peer, known, track, inputs

    def inputs(self, peer: PeerState, known: PeerRecord, track: Track
               ) -> tuple[object, ...] | None:
        """What a pass over `peer` reads, or None while an event for it waits. Compared item
        by item, mostly by identity (a record or a memory is replaced, not changed): what
        every peer reads alike is kept as one object while it stays equal. A key costs a
        Python call to hash: empty tables are not asked."""
        key = peer.public_key
        view, relays, upgraded = self.view, self.relays, self.upgrades.upgraded
        if ((view.punched or view.opened or view.flipped)
                and (key in view.punched or key in view.opened or key in view.flipped)):
            return None
        if not self.upgrades.settled(key):
            return None
        common = (None if view.me is None else view.peers.get(view.me), view.me, view.local,
                  view.mapped, self.can_open(), self.idle.found, relays.registry,
                  self.upgrades.listening)
        if common != self._common:
            self._common = common
        return (self._common, peer, known, view.roles.get(key) if view.roles else None,
                relays.offers.get(key) if relays.offers else None,
                relays.leases.get(key) if relays.leases else None,
                upgraded.get(key) if upgraded else None,
                track.memory, track.path, track.reason)

    def settle(self, peer: PeerState, known: PeerRecord, track: Track,
               before: tuple[object, ...] | None, decision: Decision, recheck_s: float,
               now: float, now_wall: float) -> None:
        """After a full pass over `peer` that read `before`: whether it settled it."""
        track.settled = None
        if (before is None or decision.kind is not Kind.LEAVE
                or decision.reason not in LASTING or recheck_s < self.t.idle_recheck_s
                or not self.relays.settled(peer.public_key, track.memory, live=decision.live)
                # A keepalive it failed to lower is tried again next pass, as before.
                or self.idle.lowers(peer, live=peer.has_live_session(
                    now_wall, self.t.session_live_s)) is not None):
            return
        after = self.inputs(peer, known, track)
        if after is None or after != before:
            return
        until, until_wall = horizon(peer, track.memory, now_wall, self.t)
        track.settled = Settled(after, now, now_wall, until, until_wall)
