"""UDP sockets for the rendezvous handlers (server.py, legacy.py).

A handler turns one datagram into one reply or none and raises for a datagram it cannot
read; here such a datagram is dropped, counted and logged at most once per source per
`MALFORMED_LOG_S`, and any other exception is logged the same way: no datagram can stop the
server. Everything a handler does is O(1) in the table sizes, so one slow datagram cannot
hold up the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any, Protocol

from ..errors import MalformedPacket, NoiseError, WgpunchError
from ..throttle import Throttle
from ..wg.model import Endpoint

log = logging.getLogger(__name__)

MALFORMED_LOG_S = 60.0


class Handler(Protocol):
    counts: Any  # collections.Counter[str]

    def handle(self, data: bytes, source: Endpoint, now: float) -> bytes | None: ...


def source_endpoint(addr: tuple[Any, ...]) -> Endpoint:
    ip = ipaddress.ip_address(addr[0].partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 sender
        ip = ip.ipv4_mapped
    return Endpoint(ip, addr[1])


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler, name: str, sock: socket.socket) -> None:
        self.handler = handler
        self.name = name
        # Replies go out on the socket itself: asyncio's sendto silently drops an empty
        # datagram (CPython 3.11), and "not found" is one. A reply the socket cannot take
        # now is dropped, as the kernel drops what does not fit, rather than queued.
        self.sock = sock
        self._throttle = Throttle(MALFORMED_LOG_S)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = time.monotonic()
        try:
            source = source_endpoint(addr)
            if source.port == 0:
                raise MalformedPacket("source port 0")
            reply = self.handler.handle(data, source, now)
        except (MalformedPacket, NoiseError, WgpunchError, ValueError) as error:
            self.handler.counts["malformed"] += 1
            self._note(addr, now, logging.DEBUG, "dropped a datagram: %s", error)
            return
        except Exception:  # a bug must cost one datagram, not the server
            self.handler.counts["errors"] += 1
            self._note(addr, now, logging.ERROR, "failed on a datagram", exc_info=True)
            return
        if reply is None:
            return
        try:
            self.sock.sendto(reply, addr)
        except OSError:  # the buffer is full (BlockingIOError), or the route went away
            self.handler.counts["reply_dropped"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("%s: %s", self.name, exc)

    def _note(self, addr: tuple[Any, ...], now: float, level: int, message: str,
              *args: Any, exc_info: bool = False) -> None:
        held = self._throttle.allow(addr[0], now)
        if held is None:
            return
        suffix = f" ({held} more from this address not logged)" if held else ""
        log.log(level, f"%s: from %s: {message}{suffix}", self.name, addr[0], *args,
                exc_info=exc_info)


async def listen(handler: Handler, endpoint: Endpoint, name: str) -> asyncio.DatagramTransport:
    """Serve `handler` on a UDP socket bound to `endpoint` (`[::]` takes IPv4 too)."""
    family = socket.AF_INET6 if endpoint.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and endpoint.ip.is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((str(endpoint.ip), endpoint.port))
    except OSError as error:
        sock.close()
        raise WgpunchError(f"{name}: cannot listen on {endpoint}: {error.strerror}") from None
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(handler, name, sock),
                                                       sock=sock)
    return transport
