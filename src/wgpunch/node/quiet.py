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
from dataclasses import dataclass

from ..protocol import PeerRecord
from ..wg.device import PeerState
from .decide import Decision, Kind, Memory, Reason, Timings
from .follow import RegistryView
from .natidle import IdleWatch
from .relay import Relays
from .track import Track
from .upgrade import Upgrades

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
                 t: Timings) -> None:
        self.view = view
        self.relays = relays
        self.upgrades = upgrades
        self.idle = idle
        self.t = t
        self._common: tuple[object, ...] = ()

    def common(self, *, can_open: bool) -> tuple[object, ...]:
        """What every peer's pass reads alike: the same object while it stays equal, so that
        each peer's comparison is one identity check."""
        view = self.view
        common = (None if view.me is None else view.peers.get(view.me), view.me, view.local,
                  view.mapped, can_open, self.idle.found, self.relays.registry,
                  self.upgrades.listening)
        if common != self._common:
            self._common = common
        return self._common

    def inputs(self, peer: PeerState, known: PeerRecord, track: Track,
               common: tuple[object, ...]) -> tuple[object, ...] | None:
        """What a pass over `peer` reads (with `common`), or None while an event for it
        waits. Compared item by item, mostly by identity (a record or a memory is replaced,
        not changed). A key costs a Python call to hash: empty tables are not asked."""
        key = peer.public_key
        view, relays, upgraded = self.view, self.relays, self.upgrades.upgraded
        if ((view.punched or view.opened or view.flipped)
                and (key in view.punched or key in view.opened or key in view.flipped)):
            return None
        if not self.upgrades.settled(key):
            return None
        return (common, peer, known, view.roles.get(key) if view.roles else None,
                relays.offers.get(key) if relays.offers else None,
                relays.leases.get(key) if relays.leases else None,
                upgraded.get(key) if upgraded else None,
                track.memory, track.path, track.reason)

    def skips(self, track: Track, inputs: tuple[object, ...] | None, now: float,
              now_wall: float) -> bool:
        return (inputs is not None and track.settled is not None
                and track.settled.holds(inputs, now, now_wall))

    def settle(self, peer: PeerState, known: PeerRecord, track: Track,
               before: tuple[object, ...] | None, decision: Decision, recheck_s: float, *,
               can_open: bool, now: float, now_wall: float) -> None:
        """After a full pass over `peer` that read `before`: whether it settled it."""
        track.settled = None
        if (before is None or decision.kind is not Kind.LEAVE
                or decision.reason not in LASTING or recheck_s < self.t.idle_recheck_s
                or not self.relays.settled(peer.public_key, track.memory, live=decision.live)):
            return
        after = self.inputs(peer, known, track, self.common(can_open=can_open))
        if after is None or after != before:
            return
        until, until_wall = horizon(peer, track.memory, now_wall, self.t)
        track.settled = Settled(after, now, now_wall, until, until_wall)
