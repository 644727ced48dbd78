"""Following a natpunch rendezvous server (`wgpunch rendezvous`, natpunch-go's server, or the
wireguard-tools example server) that is not a WireGuard peer.

Every poll asks the server for each peer of the local device, one request at a time, sent
from our WireGuard listen port on a raw socket (natpunch/rawudp.py): so each request also
registers, as our endpoint, the NAT mapping that WireGuard's own packets use. The answers
feed the same agent as the HTTP API, as one snapshot per poll; the server cannot coordinate
punches, so each side tries alone, as with DNS-SD (node/decide.py still never touches a live
session).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

from ..errors import ApiError, ConfigError, WgpunchError
from ..keys import Key
from ..natpunch.client import LegacyClient, NoiseClient
from ..natpunch.rawudp import RawUdp
from ..protocol import Event, PeerRecord, RelayEvent, Reported, Snapshot
from ..wg.device import Device
from ..wg.model import Endpoint
from .edges import Clock, SystemClock
from .source import polled

log = logging.getLogger(__name__)

EPOCH = "natpunch"  # a rendezvous server has no epoch: every poll is a full snapshot
# A peer with a live session is asked about less and less often (its endpoint can only
# matter again when the session ends, and WireGuard follows a peer that roams), doubling from
# the poll interval up to this. Our choice: a minute is soon enough to learn that a peer
# moved while our session with it lives on.
LIVE_RECHECK_MAX_S = 60.0
# When a poll asks about no peer, we register anyway this often, so that the server keeps our
# entry fresh: natpunch-go keeps entries forever, ours forgets them after --peer-ttl (600 s).
REGISTER_EVERY_S = 30.0


async def resolve_server(text: str, default_port: int) -> Endpoint:
    """`HOST[:PORT]` to an IPv4 endpoint: the raw socket speaks IPv4 only (rawudp.py)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:
        host, port_text = text, str(default_port)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"node: natpunch server {text!r}: PORT must be in 1-65535")
    host = host.strip("[]")
    try:
        found = await asyncio.get_running_loop().getaddrinfo(
            host, int(port_text), family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except socket.gaierror as error:
        raise ConfigError(f"node: natpunch server {host!r}: no IPv4 address "
                          f"({error.strerror}); natpunch is IPv4 only") from None
    return Endpoint(ipaddress.ip_address(found[0][4][0]), int(port_text))


class NatpunchSource:
    """The agent's view of a rendezvous server; the same shape as `RegistryClient`.

    `server_key` selects natpunch-go's protocol (authenticated, our WireGuard key as the
    Noise static key); None selects the wireguard-tools example protocol.
    """

    coordinates_punches = False

    def __init__(self, server: Endpoint, server_key: Key | None, device: Device, *,
                 interval_s: float = 5.0, clock: Clock | None = None) -> None:
        self.server = server
        self.clock = clock or SystemClock()
        self.server_key = server_key
        self.device = device
        self.interval_s = interval_s
        self.failed: set[Key] = set()  # peers whose last lookup failed (for --once)
        self._raw: RawUdp | None = None
        self._client: NoiseClient | LegacyClient | None = None
        self._port: int | None = None
        self._public: Key | None = None
        # Per peer: its last answer, and for a peer with a live session, how long we now wait
        # between questions and when the next is due (monotonic).
        self._answers: dict[Key, Endpoint] = {}
        self._recheck_s: dict[Key, float] = {}
        self._due: dict[Key, float] = {}
        self._asked_at = float("-inf")

    @property
    def following(self) -> str:
        protocol = "legacy" if self.server_key is None else "noise"
        return f"natpunch {self.server} ({protocol}): polling every {self.interval_s:g} s"

    async def connect(self, listen_port: int, public: Key | None = None
                      ) -> NoiseClient | LegacyClient:
        """A client for the WireGuard port and key as they are now (both can change under
        us: a new key needs a new Noise session)."""
        if self._client is not None and (self._port, self._public) == (listen_port, public):
            return self._client
        await self.close()
        self._raw = RawUdp(listen_port, self.server)
        self._port, self._public = listen_port, public
        if self.server_key is None:
            self._client = LegacyClient(self._raw)
        else:
            private = await self.device.private_key()
            if private is None:
                raise WgpunchError(f"natpunch: {self.device.name} has no private key")
            self._client = NoiseClient(self._raw, private, self.server_key)
        return self._client

    async def snapshot(self) -> Snapshot:
        state = await self.device.state()
        if state.public_key is None:
            raise WgpunchError(f"natpunch: {state.name} has no private key")
        if not state.listen_port:
            raise WgpunchError(f"natpunch: {state.name} has no listen port")
        client = await self.connect(state.listen_port, state.public_key)
        records = []
        keys = [peer.public_key for peer in state.peers]
        self.failed &= set(keys)
        for forgotten in set(self._answers) - set(keys):
            self._forget(forgotten)
        now, now_wall = self.clock.monotonic(), self.clock.wall()
        asked = answered = False
        for peer in state.peers:
            key = peer.public_key
            live = peer.has_live_session(now_wall)
            if live and key in self._answers and now < self._due.get(key, now):
                records.append(PeerRecord(key, (), self._answers[key], None, None, 0))
                continue  # nothing to learn about it yet (LIVE_RECHECK_MAX_S)
            asked = True
            try:
                found = await client.lookup(state.public_key, key)
            except WgpunchError as error:  # no answer, or the send failed (no route)
                log.debug("natpunch lookup of %s failed: %s", key, error)
                self.failed.add(key)
                if not answered:  # the server is away: don't wait out every peer's retries
                    self.failed.update(keys)
                    break
                continue
            answered = True
            self.failed.discard(key)
            self._note(key, found, live, now)
            if found is not None:
                records.append(PeerRecord(key, (), found, None, None, 0))
        if not asked and now - self._asked_at >= (REGISTER_EVERY_S if keys else 0):
            try:
                await client.register(state.public_key)
                asked = answered = True
            except WgpunchError as error:
                log.debug("natpunch registration failed: %s", error)
        if asked:
            self._asked_at = now
            if not answered:
                raise ApiError(f"natpunch: no answer from {self.server}")
        return Snapshot(EPOCH, 0, tuple(records))

    def _note(self, key: Key, found: Endpoint | None, live: bool, now: float) -> None:
        """Remember an answer and when to ask about `key` next: a peer whose session is
        live and whose endpoint did not change waits twice as long as before."""
        same = found is not None and self._answers.get(key) == found
        if found is None:
            self._forget(key)
            return
        self._answers[key] = found
        wait = (min(2 * self._recheck_s.get(key, self.interval_s / 2), LIVE_RECHECK_MAX_S)
                if live and same else self.interval_s)
        self._recheck_s[key], self._due[key] = wait, now + wait

    def _forget(self, key: Key) -> None:
        self._answers.pop(key, None)
        self._recheck_s.pop(key, None)
        self._due.pop(key, None)

    def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        return polled(self.interval_s, self.snapshot)

    async def relay(self, peer: Key) -> RelayEvent:
        raise ApiError("natpunch: a rendezvous server hands out no relay slots")

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        raise ApiError("natpunch: a rendezvous server hands out no relay slots")

    async def punch(self, peer: Key) -> None:
        raise ApiError("natpunch: a rendezvous server cannot coordinate punches")

    async def opened(self, peer: Key) -> None:
        raise ApiError("natpunch: a rendezvous server cannot coordinate punches")

    async def report_self(self, report: Reported) -> None:
        """A rendezvous server takes no reports."""

    def lookup_failed(self, peer: Key) -> bool:
        return peer in self.failed

    async def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        self._raw = self._client = self._port = self._public = None
