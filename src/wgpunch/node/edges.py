"""What the node agent reads and sends besides its device and its registry: the clock, NAT
openers, path probes, its own addresses. Two small interfaces, so that a test runs the real
agent in its own event loop with a clock it controls and senders that only record (tests/
test_node_agent.py); the production ones here do what the agent always did.

`Clock`: `wall()` is Unix time, what WireGuard's handshake times are compared with;
`monotonic()` is for intervals (decide()'s `now`).

`Io`: every packet the agent sends itself, and the look-ups that go with them. Each blocking
call runs in a thread, so the event loop keeps answering meanwhile; nothing happens on
construction (the raw-socket check is `can_send_raw()`, which `Agent.run` calls).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Protocol

from ..wg.model import Endpoint, IPAddress, IPInterface
from . import addresses, probe, punch


class Clock(Protocol):
    def wall(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Io(Protocol):
    def can_send_raw(self) -> bool:
        """Whether NAT openers can be sent from here (CAP_NET_RAW): node/punch.py."""
        ...

    async def open(self, listen_port: int, endpoint: Endpoint, ttl: int) -> bool:
        """One NAT opener from our WireGuard port toward `endpoint`; False when impossible."""
        ...

    async def probe(self, ifname: str, address: IPAddress) -> bool:
        """One path probe into the tunnel toward a peer's tunnel `address`: node/probe.py."""
        ...

    async def local_addresses(self, ifname: str) -> list[IPInterface]:
        """This host's addresses (with prefixes) but those of `ifname`, for our report and
        our LAN candidates: node/addresses.py."""
        ...

    async def opener_hops(self, toward: ipaddress.IPv4Address) -> int | None:
        """The TTL that passes our own NATs, measured toward `toward`: node/punch.py."""
        ...


class SystemIo:
    """The real senders, from this process's network namespace."""

    def can_send_raw(self) -> bool:
        return punch.can_send_raw()

    async def open(self, listen_port: int, endpoint: Endpoint, ttl: int) -> bool:
        return await asyncio.to_thread(punch.send_opener, listen_port, endpoint, ttl)

    async def probe(self, ifname: str, address: IPAddress) -> bool:
        return await asyncio.to_thread(probe.send_probe, ifname, address)

    async def local_addresses(self, ifname: str) -> list[IPInterface]:
        return await asyncio.to_thread(addresses.local_addresses, ifname)

    async def opener_hops(self, toward: ipaddress.IPv4Address) -> int | None:
        return await asyncio.to_thread(punch.opener_hops, toward)
