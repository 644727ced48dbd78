"""Kicks: when the endpoint the registry observes for a node moves, a datagram through the
tunnel tells the node which revision its watch stream should have delivered
(protocol/kickwire.py; docs/api.md, "Kick"; node/kick.py acts on it).

Why: a node whose NAT lost its state (a reboot, a carrier NAT handing out a new port) drops
whatever the registry sends until its own next packet maps it again (its heartbeat, within a
second: node/registrylink.py). The watch stream's segments lost meanwhile are sent again on
TCP's own back-off, doubling from 0.2 s, so the stream that carries the news of the new
endpoints was the last thing to recover: in the lab (bench/time_to_direct.py forget, 20 runs)
nodes heard 0.6-1.5 s after the registry saw their new port, 6.8 s once, and every run over
2 s was one of those. The registry sees the new port as soon as the node's packet arrives; a
kick sent then reaches the node at once, and the node opens a new stream from its last
revision instead of waiting for the old one.

Cost: nothing while endpoints stay put. Per move, up to `Timings.kicks` (6) datagrams of ~30
bytes to each stream the node holds, `kick_again_s` (0.3 s) apart, while that stream stays
open (a node that opened a new one closed it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from ..keys import Key
from ..protocol.kickwire import PORT, Kick, encode_kick
from .state import RegistryState
from .stream import Stream
from .timings import Timings

log = logging.getLogger(__name__)


class Kicker:
    def __init__(self, state: RegistryState, timings: Timings, port: int = PORT) -> None:
        self._state = state
        self._again_s = timings.kick_again_s
        self._kicks = timings.kicks
        self._port = port
        self._sockets: dict[int, socket.socket] = {}
        self._closed = False
        self.sent = 0

    def moved(self, node: Key, revision: int) -> None:
        """`node`'s observed endpoint moved with change `revision`: kick its streams."""
        data = encode_kick(Kick(self._state.epoch, revision))
        loop = asyncio.get_running_loop()
        for stream in self._state.streams_of(node):
            self._send(stream, data)
            for n in range(1, self._kicks):
                loop.call_later(n * self._again_s, self._again, stream, data)

    def _again(self, stream: Stream, data: bytes) -> None:
        if not stream.closed:
            self._send(stream, data)

    def _send(self, stream: Stream, data: bytes) -> None:
        if stream.address is None or self._closed:
            return
        try:
            address = ipaddress.ip_address(stream.address)
            sock = self._socket(address.version)
            sock.sendto(data, (str(address), self._port))
            self.sent += 1
        except (OSError, ValueError) as error:  # a kick is a hint: the stream recovers anyway
            log.debug("kick to %s at %s: %s", stream.caller, stream.address, error)

    def _socket(self, version: int) -> socket.socket:
        sock = self._sockets.get(version)
        if sock is None:
            family = socket.AF_INET6 if version == 6 else socket.AF_INET
            sock = self._sockets[version] = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        return sock

    def close(self) -> None:
        self._closed = True
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def install(app: web.Application, state: RegistryState, timings: Timings) -> Kicker:
    """Kick nodes whose endpoint moves, while `app` runs."""
    kicker = Kicker(state, timings)

    async def run_kicks(app: web.Application) -> AsyncIterator[None]:
        state.on_moved = kicker.moved
        try:
            yield
        finally:
            state.on_moved = None
            kicker.close()

    app.cleanup_ctx.append(run_kicks)
    return kicker
