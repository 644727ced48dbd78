"""The natpunch-go protocol, server side: datagram in, reply (or nothing) out.

A node handshakes with its WireGuard key as the Noise static key, so the server knows which
key is talking and a node can only register itself; the source address of its datagrams,
sent from its WireGuard port, is its public endpoint. Then each request `my_key ‖ their_key`
re-registers the sender and asks for one peer's endpoint.

What differs from the reference server (shared/reference/natpunch.md B): every length is
checked before anything is read and a bad datagram is dropped and counted, never a crash;
the server assigns random free session indexes (the reference leaves a nil entry behind at
the client's index, which crashes it when used); peers and sessions expire and both tables
are bounded; handshakes are rate-limited per source address; an allow-list can restrict who
registers and who can be found.

Replay protection is the reference's: a handshake's timestamp must be newer than the last
one accepted for its key, and request nonces pass a sliding window. The last timestamps are
kept apart from the peers, in a table of their own that forgets nothing by age: a key's
entry expires after `peer_ttl_s`, its timestamp stays, so a handshake captured earlier and
replayed after the key expired is still refused (the reference forgets nothing, so it refuses
it too; until this table, wgpunch accepted it and served the replayer's address). The table
holds `Limits.stamps_max` keys (at least `peers_max`), the least recently heard going first;
a key leaves it only after that many other keys completed a handshake since it was last
heard, at most `handshakes_per_s` a second: 33 s at the defaults, and only by keys the server
accepts (`--allow`). Each session keeps its handshake's timestamp, and a request puts it back
should it have been pushed out.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field

from ..errors import MalformedPacket
from ..keys import Key
from ..wg.model import Endpoint
from . import wire
from .limits import Buckets, Limits, source_of
from .noise import CipherState, HandshakeIK, ReplayWindow
from .table import Table

log = logging.getLogger(__name__)

SESSIONS_PER_KEY = 2  # the current one, and the one before it for replies still in flight


@dataclass(slots=True)
class Peer:
    endpoint: Endpoint
    sessions: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Session:
    key: Key
    receive: CipherState
    send: CipherState
    window: ReplayWindow = field(default_factory=ReplayWindow)
    sent: int = 0
    stamp: int = 0  # its handshake's timestamp: the key's, should `stamps` have lost it


class NoiseRendezvous:
    def __init__(self, static_private: Key, *, allowed: frozenset[Key] | None = None,
                 limits: Limits | None = None) -> None:
        self._private = static_private.raw
        self.allowed = allowed
        self.limits = limits = limits or Limits()
        self.peers: Table[Key, Peer] = Table(limits.peers_max, limits.peer_ttl_s)
        self.sessions: Table[int, Session] = Table(
            SESSIONS_PER_KEY * limits.peers_max, limits.session_ttl_s
        )
        # The newest handshake timestamp accepted per key, kept however long ago: a key in
        # `peers` must have one, so it holds at least as many.
        self.stamps: Table[Key, int] = Table(max(limits.stamps_max, limits.peers_max),
                                             math.inf)
        self._per_source = Buckets(limits.handshakes_per_source_s, limits.handshake_burst)
        self._overall = Buckets(limits.handshakes_per_s, limits.handshakes_per_s)
        self.counts: Counter[str] = Counter()

    def handle(self, data: bytes, source: Endpoint, now: float) -> bytes | None:
        """The reply to one datagram from `source`, or None. `now` is monotonic seconds.
        Raises `MalformedPacket` or `noise.NoiseError` for a datagram to drop as malformed."""
        kind = data[0] if data else None
        if kind == wire.HANDSHAKE_INIT:
            return self._handshake(data, source, now)
        if kind == wire.DATA:
            return self._request(data, source, now)
        raise MalformedPacket(f"unknown message type {kind}")

    def _handshake(self, data: bytes, source: Endpoint, now: float) -> bytes | None:
        _, noise = wire.parse_handshake_init(data)  # the client's index names nothing here
        if not (self._per_source.allow(source_of(source.ip), now)
                and self._overall.allow(None, now)):
            self.counts["rate_limited"] += 1
            return None
        handshake = HandshakeIK.responder(self._private, wire.PROLOGUE)
        stamp = wire.parse_timestamp(handshake.read_message(noise))
        remote = handshake.remote_static
        assert remote is not None  # IK: message 1 carries the initiator's static key
        key = Key(remote)
        if not self._may_use(key):
            self.counts["refused"] += 1
            return None
        last = self.stamps.get(key, now)
        if last is not None and stamp <= last:
            self.counts["replayed"] += 1
            return None
        response = handshake.write_message(b"")
        receive, send = handshake.split()
        index = self._free_index()
        self.sessions.put(index, Session(key, receive, send, stamp=stamp), now)
        self.stamps.put(key, stamp, now)
        peer = self.peers.get(key, now) or Peer(source)
        peer.sessions.append(index)
        for old in peer.sessions[:-SESSIONS_PER_KEY]:
            self.sessions.pop(old)
        del peer.sessions[:-SESSIONS_PER_KEY]
        self._register(key, peer, source, now)
        self.counts["handshakes"] += 1
        return wire.handshake_resp(index, response)

    def _request(self, data: bytes, source: Endpoint, now: float) -> bytes | None:
        index, nonce, sealed = wire.parse_request(data)
        session = self.sessions.get(index, now)
        if session is None:
            self.counts["unknown_session"] += 1
            return None
        plain = session.receive.decrypt(nonce, b"", sealed)
        if not session.window.accept(nonce):
            self.counts["replayed"] += 1
            return None
        mine, target = wire.parse_lookup(plain)
        if mine != session.key:
            raise MalformedPacket("a request in another key's name")
        peer = self.peers.get(mine, now) or Peer(source, [index])
        last = self.stamps.get(mine, now)  # refreshed: a key heard from is the last to go
        self.stamps.put(mine, session.stamp if last is None else max(last, session.stamp), now)
        self._register(mine, peer, source, now)
        found = self.peers.get(target, now) if self._may_use(target) else None
        endpoint = None if found is None else found.endpoint
        self.counts["found" if endpoint else "not_found"] += 1
        log.debug("natpunch: %s asks for %s: %s", mine, target, endpoint or "not found")
        counter = session.sent
        session.sent += 1
        sealed = session.send.encrypt(counter, b"", wire.encode_address(endpoint))
        return wire.reply(counter, sealed)

    def _register(self, key: Key, peer: Peer, source: Endpoint, now: float) -> None:
        if key not in self.peers or peer.endpoint != source:
            log.info("natpunch: %s at %s", key, source,
                     extra={"event": "registered", "peer": str(key), "endpoint": str(source)})
        peer.endpoint = source
        self.peers.put(key, peer, now)

    def _may_use(self, key: Key) -> bool:
        return not key.is_zero() and (self.allowed is None or key in self.allowed)

    def _free_index(self) -> int:
        while True:
            index = secrets.randbits(32)
            if index not in self.sessions:
                return index

