"""When a peer goes through a relay slot (DESIGN.md §6), and what `status` says about it.

A peer whose punch has produced no handshake within `after_s`, or whose NAT and ours leave
no direct path at all (protocol.relay_reason), gets a relay slot from the registry
(`POST /v1/relay`); the registry tells the peer's agent at the same time (a `relay` event),
so both sides hold the slot within a round trip. While no session is up, the slot is the
peer's only candidate (candidates.py, kind `relay`), so that decide() moves the pair there
at once and both sides stay there in step: a punch through the registry, and both sides'
handshake-now toward their own relay port. Once a session is up it is one more candidate,
ranked below every direct one, unless both NATs rule every direct path out (then it stays
the only one). The relay drops what reaches it before the other side is bound, so the first
initiation binds one side, the other's binds the other side and goes through; no initiator
rule is needed.

`want_slot` is the pure rule; `Relays` holds the slots and asks for them in the background.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..errors import ApiError
from ..keys import Key
from ..protocol import RelayEvent
from ..wg.model import Endpoint
from .candidates import Candidate, CandidateKind, PathKind
from .decide import Memory
from .source import Source
from .track import Track

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class RelayTimings:
    # A punch with no handshake this long after our first attempt: ask for a slot. Above
    # the first punch's own retry (timings.Timings.first_retry_s, 0.5 s) and every lab round
    # trip, so a pair that can go direct does (bench/time_to_direct.py: easy p95 0.05 s);
    # DESIGN.md §3 asks for "about a second".
    after_s: float = 1.0
    # The same while either side's NAT behaviour is not known yet: who initiates then falls
    # to key order, and the NAT measurement (beside the first report, ~1 s into a lab run)
    # may well give the next punch the right initiator. With 1 s here, cone x symmetric
    # cells that go direct once both NATs are known were relayed in 1 of 2 runs.
    after_unknown_s: float = 3.0
    # A slot request that failed, or a slot that got no handshake, is asked for again after
    # this long, doubled per ask without a live session since, up to max_retry_s: a registry
    # without --relay answers 404 to every request, and a peer that is offline (its endpoint
    # still known) never binds its side.
    retry_s: float = 10.0
    max_retry_s: float = 300.0
    # Punch rounds toward a slot without a handshake before it is given up and asked for
    # again (which lets our side move, DESIGN.md §6): 0.5 + 1 + 2 s of decide's backoff,
    # far beyond a relayed handshake's round trip.
    slot_attempts: int = 3
    # A live session through the slot that stalled (decide: we send, hear nothing, a probe
    # went unanswered) asks for the slot again with its first stall punch, which makes a
    # relay that restarted hold it again (lab: a remote relay's kill -9 and restart left a
    # relayed pair silent until its session died, 35 s). Asking again costs a working slot
    # nothing: our side stays bound, or moves with our next datagram. Again after retry_s,
    # doubled, while the session stays silent.


def retry_after(asks: int, t: RelayTimings) -> float:
    """How long after the last of `asks` slot requests (without a live session since) the
    next may go."""
    return min(t.retry_s * 2.0 ** max(0, asks - 1), t.max_retry_s)


class Why(enum.StrEnum):
    NO_HANDSHAKE = "relayed: a punch got no handshake within a second"
    PEER_ASKED = "relayed: the peer's punch got no handshake, it asked for the slot"
    IMPOSSIBLE = "relayed"  # followed by the protocol's relay_reason


def want_slot(mem: Memory, now: float, t: RelayTimings, *, live: bool,
              asked_at: float | None, asks: int = 1, impossible: bool = False,
              nats_known: bool = True) -> bool:
    """Whether to ask for a slot for a peer (without one) now: at once when both NATs'
    behaviour says no direct path can exist (`impossible`: protocol.relay_reason, from what
    both nodes reported), else once a punch has had `after_s` without a handshake."""
    if live or (asked_at is not None and now - asked_at < retry_after(asks, t)):
        return False
    if impossible:
        return True
    after_s = t.after_s if nats_known else t.after_unknown_s
    return mem.first_attempt_at is not None and now - mem.first_attempt_at >= after_s


def slot_endpoint(event: RelayEvent, registry: Endpoint | None) -> Endpoint | None:
    """Where our device sends for the peer: the event's address, else the registry's
    endpoint address as our device has it (the relay runs beside the registry)."""
    ip = event.address if event.address is not None else (
        None if registry is None else registry.ip)
    return None if ip is None else Endpoint(ip, event.port)


@dataclass(frozen=True, slots=True)
class Lease:
    endpoint: Endpoint
    why: str  # what status shows as the reason


class Relays:
    """The agent's relay slots, by peer. `offers` is where the registry's answers and relay
    events land (RegistryView.relays); `wake` makes the agent reconcile."""

    def __init__(self, client: Source, offers: dict[Key, RelayEvent], wake: Callable[[], None],
                 t: RelayTimings | None = None) -> None:
        self.client = client
        self.offers = offers
        self.wake = wake
        self.t = t or RelayTimings()
        self.registry: Endpoint | None = None  # the registry's endpoint on our device
        self.leases: dict[Key, Lease] = {}
        self._asked: dict[Key, float] = {}
        self._asks: dict[Key, int] = {}  # requests since the peer was last live
        # Slots that went away while our device sent to them (a registry restart).
        self._stale: dict[Key, Endpoint] = {}
        self._mine: set[Key] = set()  # offers that answer our own request
        self._why: dict[Key, str] = {}  # why we asked, by peer
        # Asks for a slot whose live session went silent: how many since it last carried
        # traffic, and when the last went.
        self._silent: dict[Key, tuple[int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def plan(self, peer: Key, candidates: Sequence[Candidate], mem: Memory, *, live: bool,
             current: Endpoint | None, now: float, impossible: str | None = None,
             nats_known: bool = True, stalled: bool = False
             ) -> tuple[tuple[Candidate, ...], Memory]:
        """The peer's candidates with its slot, and its memory with the direct candidates
        failed when the slot is new; asks for a slot when `want_slot` says so (`impossible`:
        why no direct path can exist, protocol.relay_reason), at once when the slot our
        device sends to (`current`) is gone (the registry restarted), and again when a live
        session through it `stalled` (Memory.stalled) and a probe went unanswered."""
        lease, old = self._lease(peer), self.leases.get(peer)
        if live and peer not in self._stale:
            self._asks.pop(peer, None)  # back-off starts over once a path works
        if old is not None and lease != old:
            del self.leases[peer]
            if current == old.endpoint:
                self._stale[peer] = old.endpoint
                self._asked.pop(peer, None)  # ask at once
        if (lease is not None and not live and mem.attempt_endpoint == lease.endpoint
                and mem.attempts > self.t.slot_attempts):
            # The slot got no handshake (the relay restarted, the slot expired): ask again.
            self.offers.pop(peer, None)
            self.leases.pop(peer, None)
            lease = None
        if not (live and stalled):
            self._silent.pop(peer, None)
        elif lease is not None and current == lease.endpoint and mem.attempts:
            self._ask_again(peer, lease, now)
        if lease is None:
            asked, asks = self._asked.get(peer), self._asks.get(peer, 0)
            if self.client.coordinates_punches and (
                    want_slot(mem, now, self.t, live=live, asked_at=asked, asks=asks,
                              impossible=impossible is not None, nats_known=nats_known)
                    or (peer in self._stale and (
                        asked is None or now - asked >= retry_after(asks, self.t)))):
                self._why[peer] = (Why.NO_HANDSHAKE.value if impossible is None
                                   else f"{Why.IMPOSSIBLE.value}: {impossible}")
                self._ask(peer, now)
            stale = self._stale.get(peer)
            if live and stale is not None and stale == current:
                # A live session on a slot that is gone, a new one asked for: it stays there
                # until the new slot comes, not moved to a direct path, which the NATs rule
                # out or which failed before (a probe through the gone slot goes unanswered,
                # and decide() would repoint the session to the best direct candidate).
                return (Candidate(CandidateKind.RELAY, stale),), mem
            return tuple(candidates), mem
        relay = Candidate(CandidateKind.RELAY, lease.endpoint)
        if self.leases.get(peer) != lease:
            self.leases[peer] = lease
            if not live:
                log.info("peer %s: relay slot %s (%s)", peer, lease.endpoint, lease.why,
                         extra={"event": "relay_slot", "peer": str(peer),
                                "endpoint": str(lease.endpoint)})
                # A fresh start of the attempts: the first punch toward the slot goes now,
                # and its retry after first_retry_s, not after the direct attempts' backoff
                # (a punch the registry coalesced with the last direct one pushes nothing).
                mem = replace(mem, failed=frozenset(), attempt_endpoint=None, attempt_at=None,
                              attempts=0,
                              first_attempt_at=mem.first_attempt_at or self._asked.get(peer, now))
        if not live:
            # Only the slot while it is tried: failover would otherwise go back to the direct
            # candidates once the slot's first attempt fails too, and the two sides, each
            # alternating on its own clock, could stay out of step for many rounds (lab:
            # 11.5 s to a relayed path in 1 of 12 runs, against 1.1 s).
            return (relay,), mem
        stale = self._stale.get(peer)
        if stale is not None and stale == current != lease.endpoint:
            # A live session on a slot that is gone: moved to the new one (decide() probes
            # the old path, finds it dead, and repoints), not to a direct path that failed.
            return (relay,), mem
        self._stale.pop(peer, None)
        if impossible is not None:
            # No direct path can exist: the slot stays the only candidate under a live
            # session too. Else a path probe that goes unanswered while the relay is away (a
            # registry restart) moved the session to a direct candidate; there it could
            # never work, and its slot, no longer where the device sends, was not asked for
            # again (lab: 2 of 23 registry restarts never relayed again).
            return (relay,), mem
        return (*candidates, relay), mem

    def is_slot(self, peer: Key, endpoint: Endpoint | None) -> bool:
        """Whether `endpoint` is the peer's relay slot, or the one a session stays on until
        it moves to the new one: sending there opens no NAT toward the peer, so a port
        mapping's rule of who sends first (portmap/rule.py) does not apply, and a session
        there is relayed."""
        lease = self.leases.get(peer)
        return endpoint is not None and (
            (lease is not None and lease.endpoint == endpoint)
            or self._stale.get(peer) == endpoint)

    def settled(self, peer: Key, mem: Memory, *, live: bool) -> bool:
        """Whether `plan` keeps no clock for `peer` (node/quiet.py): no slot gone stale or
        silent to ask for again, and, without a live session, no punch whose slot `after_s`
        brings and no ask whose retry a clock brings (a peer once asked for stays unsettled
        while its path is dead: whether a slot is `impossible` to do without is not kept)."""
        return (peer not in self._stale and peer not in self._silent
                and (live or (mem.first_attempt_at is None and peer not in self._asked)))

    def annotate(self, peer: Key, track: Track) -> None:
        """Say why a relayed peer is relayed (status shows it as the reason)."""
        lease = self.leases.get(peer)
        if track.path is PathKind.RELAY and lease is not None:
            track.reason = lease.why

    def _ask_again(self, peer: Key, lease: Lease, now: float) -> None:
        """Ask for the slot of a live session through it that stalled (the answer is the
        same slot, held again, or a new one that plan() moves to), with back-off."""
        asks, asked = self._silent.get(peer, (0, None))
        if asked is not None and now - asked < retry_after(asks, self.t):
            return
        log.info("peer %s: the session through relay slot %s went silent; asking for the "
                 "slot again", peer, lease.endpoint,
                 extra={"event": "relay_silent", "peer": str(peer)})
        self._silent[peer] = (asks + 1, now)
        self._ask(peer, now)

    def _lease(self, peer: Key) -> Lease | None:
        offer = self.offers.get(peer)
        endpoint = None if offer is None else slot_endpoint(offer, self.registry)
        if endpoint is None:
            return None
        why = self._why.get(peer, Why.NO_HANDSHAKE.value) if peer in self._mine else (
            Why.PEER_ASKED.value)
        return Lease(endpoint, why)

    def _ask(self, peer: Key, now: float) -> None:
        self._asked[peer] = now
        self._asks[peer] = self._asks.get(peer, 0) + 1
        task = asyncio.create_task(self._request(peer))
        self._tasks.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self._tasks.discard)

    async def _request(self, peer: Key) -> None:
        log.info("peer %s: asking for a relay slot (%s)", peer, self._why.get(peer),
                 extra={"event": "relay_request", "peer": str(peer)})
        try:
            offer = await self.client.relay(peer)
        except ApiError as error:
            log.warning("peer %s: no relay slot: %s", peer, error,
                        extra={"event": "relay_refused", "peer": str(peer)})
            return
        self._mine.add(peer)
        self.offers[peer] = offer
        self.wake()
