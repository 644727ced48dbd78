"""The socket edge of node/upgrade.py: probe datagrams (upgradewire.py) sent from our WireGuard
port on a raw socket, like the openers (punch.py), and received through a raw socket whose
BPF filter passes only datagrams to that port of the probes' length and magic
(natpunch/rawudp.py `magic_filter`): the kernel copies every UDP datagram to raw sockets
besides delivering it to WireGuard's, and the filter keeps all but ours out of this process.
`ProbeChannel` is the interface, so the prober runs in process against a fake."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from ..errors import WgpunchError
from ..natpunch.rawudp import filtered_socket, magic_filter, udp_payload
from ..wg.model import Endpoint
from . import punch
from .upgradewire import MAGIC, SIZE

log = logging.getLogger(__name__)

Heard = Callable[[Endpoint, bytes], None]  # (where it came from, the payload)


class ProbeChannel(Protocol):
    def listen(self, listen_port: int, heard: Heard) -> bool:
        """Start passing probe datagrams to `listen_port` to `heard`; False when impossible."""
        ...

    def send(self, listen_port: int, to: Endpoint, payload: bytes) -> bool:
        """One datagram from our `listen_port` to `to`; False when impossible."""
        ...

    def close(self) -> None: ...


class RawProbeChannel:
    """The real channel (CAP_NET_RAW, IPv4): nothing is opened before `listen`."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def listen(self, listen_port: int, heard: Heard) -> bool:
        if self._sock is not None:
            return True
        try:
            sock = filtered_socket(magic_filter(listen_port, SIZE, MAGIC))
        except WgpunchError as error:
            log.debug("upgrade probes: %s", error)
            return False
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock,
                                              listen_port, heard)
        return True

    @staticmethod
    def _readable(sock: socket.socket, listen_port: int, heard: Heard) -> None:
        for _ in range(64):  # a burst at most per wake-up; the rest on the next
            try:
                packet = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("upgrade probes: receive failed: %s", error)
                return
            found = udp_payload(packet)
            if found is not None and found[1] == listen_port:
                heard(found[0], found[2])

    def send(self, listen_port: int, to: Endpoint, payload: bytes) -> bool:
        return punch.send_opener(listen_port, to, punch.DEFAULT_TTL, payload)

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
