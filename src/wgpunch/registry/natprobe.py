"""The NAT probe port (docs/api.md, "NAT probe"): UDP on the registry's public address that
answers each probe (protocol/probewire.py) with the source `ip:port` it saw, and when asked
also from a second port and from a second address, so that a node learns how its NAT maps
and filters (node/natprobe.py compares the port seen here with the one the registry's
WireGuard interface observes for it).

Anyone on the internet can send here, with any source address: so a request is answered
with at most as many bytes as it has (the wire format makes a request for alternates pay for
their replies), and each source address gets at most `burst` requests at once and `per_s`
after (limits.py's RateLimiter); the rest, like anything malformed, is dropped and counted.

A request may ask for a second answer from the probe port some seconds later (at most
probewire.MAX_LATER_S; it pays for it with its size like the alternates): a node learns
whether its NAT kept the mapping that long (node/natidle.py). At most `MAX_PENDING` later
answers wait at once; more are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

from ..errors import ConfigError, MalformedPacket
from ..protocol.probewire import Ask, Reply, Via, parse_request
from ..wg.model import Endpoint, IPAddress
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

# Per source address. A node's measurement is at most 5 requests (node/natprobe.py), and a
# few nodes behind one carrier NAT share an address; our choice. A source spoofing a
# victim's address gets it no more bytes than it sends, and at most 16 requests' worth a
# second (3 KiB/s).
BURST = 32
PER_S = 16.0
# Later answers waiting at once, all sources together: 16 requests a second for 60 s from
# 4 sources; a timer each, no more memory than that. Our choice.
MAX_PENDING = 4096


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    port: int
    alt_port: int | None = None  # None: no second port
    alt_address: IPAddress | None = None  # None: no second address


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None] | None) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not derive from DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("NAT probe: %s", exc)  # an ICMP error for a reply: nothing to do

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, to)


def _bound(family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Shared: the probe keeps no state (any socket on the port answers a probe exactly as
        # another would), so two registries on one host (wg0 and wg1) both start with the
        # default ports, and the second address's socket shares the second port with the
        # wildcard one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Answer(NamedTuple):
    via: Via  # where it leaves from
    data: bytes
    after_s: float = 0.0  # when: this long after the request


def answers(data: bytes, observed: Endpoint, s: ProbeSettings) -> list[Answer]:
    """The replies to one datagram from `observed`, where each leaves from, and when;
    raises MalformedPacket."""
    request = parse_request(data)
    alt_address = s.alt_address if s.alt_address is not None and \
        s.alt_address.version == observed.ip.version else None

    def reply(how: Via) -> bytes:
        return Reply(request.txid, how, observed, s.alt_port, alt_address).encode()

    replies = [Answer(Via.PROBE_PORT, reply(Via.PROBE_PORT))]
    if request.ask & Ask.ALT_PORT and s.alt_port is not None:
        replies.append(Answer(Via.ALT_PORT, reply(Via.ALT_PORT)))
    if request.ask & Ask.ALT_ADDRESS and alt_address is not None:
        replies.append(Answer(Via.ALT_ADDRESS, reply(Via.ALT_ADDRESS)))
    if request.ask & Ask.LATER:
        replies.append(Answer(Via.LATER, reply(Via.LATER), float(request.later_s)))
    return replies


class ProbeServer:
    def __init__(self, settings: ProbeSettings, *, burst: int = BURST, per_s: float = PER_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_pending: int = MAX_PENDING) -> None:
        self.settings = settings
        self.max_pending = max_pending
        self.limiter = RateLimiter(burst, per_s)
        self.clock = clock
        self.counts: Counter[str] = Counter()
        # Per family: the socket answering on the probe port, the one sending from the
        # second port; and the one sending from the second address.
        self._probe: dict[int, _Socket] = {}
        self._alt_port: dict[int, _Socket] = {}
        self._alt_address_send: _Socket | None = None
        self._pending: set[asyncio.TimerHandle] = set()  # later answers

    async def start(self) -> None:
        """Bind every socket, or none (a ConfigError naming the one that failed)."""
        try:
            await self._start()
        except OSError as error:
            await self.close()
            raise ConfigError(f"registry: NAT probe: {error.strerror or error}") from None

    async def _start(self) -> None:
        s = self.settings
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                self._probe[family] = await self._open(family, address, s.port, answer=True)
            except OSError as error:
                if family == socket.AF_INET6 and error.errno in (errno.EAFNOSUPPORT,
                                                                 errno.EADDRNOTAVAIL):
                    continue  # no IPv6 on this host
                raise OSError(error.errno, f"cannot listen on "
                              f"{Endpoint(ipaddress.ip_address(address), s.port)}: "
                              f"{error.strerror}") from None
            if s.alt_port is not None:
                try:
                    self._alt_port[family] = await self._open(family, address, s.alt_port,
                                                              answer=False)
                except OSError as error:
                    raise OSError(error.errno, f"cannot use the second port {s.alt_port}: "
                                  f"{error.strerror}") from None
        if s.alt_address is not None:
            family = socket.AF_INET if s.alt_address.version == 4 else socket.AF_INET6
            try:
                self._alt_address_send = await self._open(
                    family, str(s.alt_address), s.alt_port or s.port + 1, answer=False)
            except OSError as error:
                raise OSError(error.errno, f"cannot use {s.alt_address} as the second "
                              f"address: {error.strerror}") from None

    async def _open(self, family: socket.AddressFamily, address: str, port: int, *,
                    answer: bool) -> _Socket:
        loop = asyncio.get_running_loop()
        sock = _bound(family, address, port)
        protocol = _Socket(None)
        protocol.on_datagram = (lambda data, src: self.received(data, src, protocol)) \
            if answer else None
        await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        return protocol

    def received(self, data: bytes, source: tuple[str, int], via: _Socket) -> None:
        """One datagram on a probe socket: answered, or dropped and counted; never raises."""
        try:
            ip = ipaddress.ip_address(source[0].partition("%")[0])
            observed = Endpoint(ip, source[1])
        except ValueError:
            self.counts["bad_source"] += 1
            return
        if self.limiter.take(ip, self.clock()) > 0:
            self.counts["rate_limited"] += 1
            return
        try:
            replies = answers(data, observed, self.settings)
        except MalformedPacket as error:
            self.counts["malformed"] += 1
            log.debug("NAT probe from %s: %s", observed, error)
            return
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        senders = {Via.PROBE_PORT: via, Via.ALT_PORT: self._alt_port.get(family),
                   Via.ALT_ADDRESS: self._alt_address_send, Via.LATER: via}
        to = (str(ip), observed.port)
        for how, reply, after_s in replies:
            sender = senders[how]
            if sender is None:
                continue
            if not after_s:
                sender.send(reply, to)
            elif len(self._pending) < self.max_pending:
                self._later(after_s, sender, reply, to)
            else:
                self.counts["later_dropped"] += 1
        self.counts["answered"] += 1

    def _later(self, after_s: float, sender: _Socket, reply: bytes, to: tuple[str, int]) -> None:
        def send() -> None:
            self._pending.discard(handle)
            sender.send(reply, to)

        handle = asyncio.get_running_loop().call_later(after_s, send)
        self._pending.add(handle)

    async def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        for protocol in [*self._probe.values(), *self._alt_port.values(),
                         self._alt_address_send]:
            if protocol is not None and protocol.transport is not None:
                with contextlib.suppress(OSError):
                    protocol.transport.close()
        self._probe.clear()
        self._alt_port.clear()
        self._alt_address_send = None
