"""Relayed pairs move back to direct by themselves (DESIGN.md §6, "Upgrade back").

While a peer's live session runs through a relay slot, the agent probes the peer's direct
candidates: one small datagram (upgradewire.py) per candidate, from our WireGuard port on the
raw socket (upgradelink.py), and the peer's agent answers each probe from its own WireGuard
port to where the probe came from. Rounds back off from `first_s` to `max_s` and start over
at once when what the registry says about either side changes (an endpoint, a NAT report, a
port mapping, the LAN addresses): that is when a direct path may have appeared.

Besides the registry's candidates, a probe goes to the peer's observed address with the
peer's own listen port when the observed port differs: a NAT that maps the peer's new flows
keeping their port (its kind changed in place, and the flow the registry sees kept its old
mapping) is reached there. Tailscale's `stun4LocalPort` endpoint is the same guess.

Which answer counts: only an answer to our own probe, from the very endpoint we probed, with
the peer's key and our probe's random id, within `answer_within_s`. It proves both directions
from our WireGuard port: the probe went out through our NAT to that endpoint, and the answer
came back in through the state it left. A probe received proves one direction only: it is
answered, and decides nothing. The side that heard the answer asks the registry to switch the
pair (`POST /v1/relay/{peer}/direct`: where we reach the peer, and where the peer saw our probe
come from); the registry pauses the slot, so that nothing relayed can make WireGuard roam back
to it, and tells both sides (a `direct` event). Each side then sets the peer's endpoint and
keeps the live session: no handshake, so no packet waits for one and the two sides cannot
cross initiations (decide.py); a path probe through the tunnel makes the peer answer at once.

The switch is verified: a byte from the peer after `settle_s` (datagrams still on their way
through the relay) and within `verify_s` keeps it; without one the peer's endpoint goes back
to the relay slot, which the agent asks for again (that resumes it, registry/relay.py), and
probing backs off. A device that roams back to the paused slot (a late relayed datagram) is
moved to the direct endpoint again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ApiError, ChangeRefused, DeviceError, MalformedPacket
from ..keys import Key
from ..protocol import PeerRecord, RelayEvent
from ..wg.device import Device
from ..wg.model import Endpoint, PeerState
from .candidates import Candidate, CandidateKind, PathKind
from .edges import Clock, Io
from .probe import tunnel_address
from .source import Source
from .timings import Timings
from .track import Track
from .upgradelink import ProbeChannel
from .upgradewire import TXID_SIZE, Answer, Probe, parse

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class UpgradeTimings:
    # The first round this long after the pair went to the relay, and the first pause between
    # rounds, doubling up to max_s (issue 14: "from seconds to a minute"). A pair relayed
    # because its punch failed rarely goes direct a second later; a path that appears later
    # is found within a minute, or at once when the registry sees what changed.
    first_s: float = 1.0
    max_s: float = 60.0
    # An answer later than this after its probe does not count: far above any round trip.
    answer_within_s: float = 2.0
    # After a switch, datagrams the relay forwarded before it paused may still arrive: bytes
    # from the peer count only after this. Many lab round trips (~1-120 ms).
    settle_s: float = 0.3
    # The switch holds if a byte comes from the peer within this long of it, else the pair
    # goes back to the relay. Our choice: a path probe is answered within a round trip.
    verify_s: float = 2.0
    # Answers we send: a burst of this many, then this many per second; a stranger can make
    # us send no more (answers are no larger than probes).
    answers_per_s: float = 20.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """When a relayed peer's next round of probes goes."""

    next_at: float
    pause_s: float  # the pause after that round
    seen: Hashable  # what the registry said of both sides when we last looked


def next_round(b: Backoff | None, now: float, seen: Hashable, t: UpgradeTimings
               ) -> tuple[Backoff, bool]:
    """The back-off after this tick, and whether a round goes now: the first one first_s
    after the peer was relayed; at once when `seen` changed."""
    if b is None:
        return Backoff(now + t.first_s, t.first_s, seen), False
    if seen != b.seen:
        b = Backoff(now, t.first_s, seen)
    if now < b.next_at:
        return b, False
    return Backoff(now + b.pause_s, min(2.0 * b.pause_s, t.max_s), seen), True


def backed_off(b: Backoff | None, now: float, t: UpgradeTimings) -> Backoff:
    """After a switch that did not hold: the next round after the current pause, doubled."""
    pause = t.first_s if b is None else b.pause_s
    return Backoff(now + pause, min(2.0 * pause, t.max_s), None if b is None else b.seen)


def seen_of(peer: PeerRecord, mine: PeerRecord | None) -> Hashable:
    """What a change of restarts the probing: both sides' endpoints and reports."""
    return (peer.endpoint, peer.reported,
            None if mine is None else mine.endpoint, None if mine is None else mine.reported)


def targets(peer: PeerRecord, candidates: Sequence[Candidate]) -> tuple[Endpoint, ...]:
    """Where to probe: the direct candidates, and the observed address with the peer's own
    listen port when that is not the observed port (the module doc). IPv4 only."""
    found = [c.endpoint for c in candidates if c.direct]
    reported = peer.reported
    if (peer.endpoint is not None and reported is not None
            and reported.listen_port != peer.endpoint.port):
        found.append(Endpoint(peer.endpoint.ip, reported.listen_port))
    return tuple(dict.fromkeys(e for e in found if e.ip.version == 4))


@dataclass(frozen=True, slots=True)
class Sent:
    peer: Key
    to: Endpoint
    at: float


def counts(sent: Sent | None, answer: Answer, source: Endpoint, now: float,
           t: UpgradeTimings) -> bool:
    """The switch rule: whether an answer proves a direct path (the module doc)."""
    return (sent is not None and answer.sender == sent.peer and source == sent.to
            and now - sent.at <= t.answer_within_s)


class Check(enum.StrEnum):
    WAIT = "wait"
    REASSERT = "the device roamed back to the paused slot: set the direct endpoint again"
    MARK = "settled: count the peer's bytes from now on"
    HOLDS = "a byte came from the peer over the direct path"
    FAILED = "no byte from the peer over the direct path"


@dataclass(frozen=True, slots=True)
class Switched:
    endpoint: Endpoint  # where our device now sends
    relay: Endpoint | None  # the slot to go back to
    at: float
    why: str
    rx_mark: int | None = None  # the peer's bytes once settled


def check(s: Switched, now: float, rx_bytes: int, current: Endpoint | None,
          t: UpgradeTimings) -> Check:
    """How a switch is doing (the module doc)."""
    if s.relay is not None and current == s.relay:
        return Check.REASSERT
    if now - s.at < t.settle_s:
        return Check.WAIT
    if s.rx_mark is None:
        return Check.MARK
    if rx_bytes != s.rx_mark:
        return Check.HOLDS
    return Check.FAILED if now - s.at >= t.verify_s else Check.WAIT


class Upgrades:
    """The agent's probing of relayed peers and their switches back to direct. `directs`
    is where the registry's `direct` events land, `offers` its relay answers (view.py)."""

    def __init__(self, channel: ProbeChannel | None, client: Source, device: Device, io: Io,
                 clock: Clock, directs: dict[Key, Endpoint], offers: dict[Key, RelayEvent],
                 wake: Callable[[], None], t: UpgradeTimings | None = None,
                 pass_t: Timings | None = None) -> None:
        self.channel = channel
        self.client = client
        self.device = device
        self.io = io
        self.clock = clock
        self.directs = directs
        self.offers = offers
        self.wake = wake
        self.t = t or UpgradeTimings()
        # How soon `step` asks for the next look: the agent's pass's own rhythm.
        self.pass_t = pass_t or Timings()
        self.me: Key | None = None
        self.listen_port = 0
        self.listening = False
        self.known: Callable[[Key], bool] = lambda _key: False
        self.backoffs: dict[Key, Backoff] = {}
        self.sent: dict[bytes, Sent] = {}
        self.answered: dict[Key, tuple[Endpoint, Endpoint]] = {}  # (to, where it saw us)
        self.posted: dict[Key, tuple[float, Endpoint]] = {}
        self.switched: dict[Key, Switched] = {}
        self.upgraded: dict[Key, tuple[Endpoint, str]] = {}  # direct again: where, why
        self._tokens, self._tokens_at = self.t.answers_per_s, 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, me: Key, listen_port: int, known: Callable[[Key], bool]) -> None:
        """Answer probes from peers `known` says are ours, and probe ours while relayed."""
        self.me, self.listen_port, self.known = me, listen_port, known
        if self.channel is not None:
            self.listening = self.channel.listen(listen_port, self.heard)

    def close(self) -> None:
        if self.channel is not None and self.listening:
            self.channel.close()
            self.listening = False

    # -- datagrams (plain def: called from the socket's reader) -------------------------------

    def heard(self, source: Endpoint, payload: bytes) -> None:
        try:
            message = parse(payload)
        except MalformedPacket:
            return
        now = self.clock.monotonic()
        if isinstance(message, Probe):
            if (self.me is not None and message.sender != self.me and self.known(message.sender)
                    and self.channel is not None and self._take(now)):
                self.channel.send(self.listen_port, source,
                                  Answer(message.txid, self.me, source).encode())
            return
        sent = self.sent.pop(message.txid, None)
        if sent is not None and counts(sent, message, source, now, self.t):
            self.answered[sent.peer] = (sent.to, message.observed)
            self.wake()

    def _take(self, now: float) -> bool:
        self._tokens = min(self.t.answers_per_s,
                           self._tokens + (now - self._tokens_at) * self.t.answers_per_s)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # -- one tick per peer ----------------------------------------------------------------

    def settled(self, peer: Key) -> bool:
        """Whether `step` keeps no clock and has nothing waiting for `peer` (node/quiet.py):
        no switch to make or verify, no answer to post, no probing rounds."""
        waiting = self.directs or self.switched or self.answered or self.backoffs
        return not waiting or (peer not in self.directs and peer not in self.switched
                               and peer not in self.answered and peer not in self.backoffs)

    def found(self, peer: Key) -> tuple[Candidate, ...]:
        """The direct endpoint a switch moved the peer to, as one more candidate while it is
        in use: decide() then keeps it even where the registry knows it not (the guess)."""
        where = self.switched[peer].endpoint if peer in self.switched else (
            self.upgraded[peer][0] if peer in self.upgraded else None)
        return () if where is None else (Candidate(CandidateKind.PUBLIC, where),)

    async def step(self, peer: PeerState, track: Track, record: PeerRecord,
                   mine: PeerRecord | None, candidates: Sequence[Candidate],
                   lease: Endpoint | None, now: float) -> float:
        """After decide() and Track.note: switch, verify, or probe; when to look again."""
        key = peer.public_key
        endpoint = self.directs.pop(key, None)
        if endpoint is not None:
            await self._switch(peer, endpoint, lease, now)
            return self.pass_t.busy_recheck_s
        switched = self.switched.get(key)
        if switched is not None:
            return await self._verify(peer, switched, now)
        if track.path in (PathKind.DIRECT, PathKind.LAN) and key in self.upgraded:
            track.reason = self.upgraded[key][1]
        elif track.path in (PathKind.RELAY, PathKind.NONE):
            self.upgraded.pop(key, None)
        if track.path is not PathKind.RELAY or lease is None or not self.listening:
            self.backoffs.pop(key, None)
            self.answered.pop(key, None)
            return self.pass_t.idle_recheck_s
        answered = self.answered.pop(key, None)
        if answered is not None:
            self._post(key, *answered, now)
        backoff, due = next_round(self.backoffs.get(key), now, seen_of(record, mine), self.t)
        self.backoffs[key] = backoff
        if due:
            self._round(key, targets(record, candidates), now)
        return max(self.pass_t.busy_recheck_s,
                   min(backoff.next_at - now, self.pass_t.idle_recheck_s))

    def _round(self, peer: Key, to: Sequence[Endpoint], now: float) -> None:
        assert self.channel is not None and self.me is not None
        self.sent = {txid: s for txid, s in self.sent.items()
                     if now - s.at <= self.t.answer_within_s}
        for endpoint in to:
            txid = os.urandom(TXID_SIZE)
            self.sent[txid] = Sent(peer, endpoint, now)
            self.channel.send(self.listen_port, endpoint, Probe(txid, self.me).encode())
        log.debug("peer %s: probing %s for a direct path", peer, ", ".join(map(str, to)))

    def _post(self, peer: Key, to: Endpoint, observed: Endpoint, now: float) -> None:
        last = self.posted.get(peer)
        if last is not None and now - last[0] < self.t.verify_s:
            return  # one request per switch: the other answers of the round say the same
        self.posted[peer] = (now, to)

        async def post() -> None:
            try:
                await self.client.direct(peer, to, observed)
            except ApiError as error:
                log.info("peer %s: %s answered our probe, but the registry did not switch "
                         "the pair: %s", peer, to, error)
        self._background(post())

    async def _switch(self, peer: PeerState, endpoint: Endpoint, lease: Endpoint | None,
                      now: float) -> None:
        key = peer.public_key
        ours = self.posted.get(key)
        why = (f"back from the relay: our probe to {endpoint} was answered"
               if ours is not None and ours[1] == endpoint
               else "back from the relay: the peer's probe of us was answered")
        try:
            await self.device.set_endpoint(key, endpoint)
        except (ChangeRefused, DeviceError) as error:
            log.warning("peer %s: moving to %s failed: %s", key, endpoint, error)
            return
        self.switched[key] = Switched(endpoint, lease, now, why)
        self.answered.pop(key, None)
        await self._tunnel_probe(peer)

    async def _verify(self, peer: PeerState, s: Switched, now: float) -> float:
        key = peer.public_key
        verdict = check(s, now, peer.rx_bytes, peer.endpoint, self.t)
        if verdict is Check.REASSERT:
            try:
                await self.device.set_endpoint(key, s.endpoint)
            except (ChangeRefused, DeviceError) as error:
                log.debug("peer %s: %s", key, error)
        elif verdict is Check.MARK:
            self.switched[key] = replace(s, rx_mark=peer.rx_bytes)
            await self._tunnel_probe(peer)
        elif verdict is Check.HOLDS:
            del self.switched[key]
            self.upgraded[key] = (s.endpoint, s.why)
            self.backoffs.pop(key, None)
            log.info("peer %s: direct again via %s (%s; the relay slot is paused)", key,
                     s.endpoint, s.why.removeprefix("back from the relay: "),
                     extra={"event": "direct_again", "peer": str(key),
                            "endpoint": str(s.endpoint), "took_s": now - s.at})
            return self.pass_t.idle_recheck_s
        elif verdict is Check.FAILED:
            del self.switched[key]
            backoff = self.backoffs[key] = backed_off(self.backoffs.get(key), now, self.t)
            log.info("peer %s: nothing came over the direct path %s within %g s; back to the "
                     "relay (next probe in %.0f s)", key, s.endpoint, self.t.verify_s,
                     backoff.next_at - now,
                     extra={"event": "direct_failed", "peer": str(key),
                            "endpoint": str(s.endpoint)})
            if s.relay is not None:
                try:
                    await self.device.set_endpoint(key, s.relay)
                except (ChangeRefused, DeviceError) as error:
                    log.warning("peer %s: moving back to the relay failed: %s", key, error)
                self._background(self._resume(key))
            return self.pass_t.idle_recheck_s
        return self.pass_t.busy_recheck_s

    async def _resume(self, peer: Key) -> None:
        """Ask for the slot again: the registry resumes it and lets our side move, which our
        device's next datagram binds at our current address."""
        try:
            self.offers[peer] = await self.client.relay(peer)
        except ApiError as error:
            log.warning("peer %s: no relay slot: %s", peer, error,
                        extra={"event": "relay_refused", "peer": str(peer)})
        self.wake()

    async def _tunnel_probe(self, peer: PeerState) -> None:
        address = tunnel_address(peer.allowed_ips)
        if address is not None:
            await self.io.probe(self.device.name, address)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self._tasks.discard)
