"""Where the node learns its peers' endpoints: the registry's HTTP API (client.py) or a DNS-SD
registry (dnssd.py), both behind one small protocol; and how the API is found."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from ..errors import ApiError, ConfigError, WgpunchError
from ..keys import Key
from ..protocol import API_PORT, Event, RelayEvent, Reported, Snapshot
from ..wg.model import DeviceState, Endpoint
from .probe import tunnel_address


def registry_api_url(state: DeviceState, registry: Key) -> str:
    peer = state.peer(registry)
    if peer is None:
        raise ConfigError(
            f"node: the registry key {registry} is not a peer of {state.name}; add it to the "
            "WireGuard configuration (with an Endpoint and PersistentKeepalive) first"
        )
    address = tunnel_address(peer.allowed_ips)
    if address is None or not any(n.prefixlen == n.max_prefixlen for n in peer.allowed_ips):
        raise ConfigError(
            f"node: the registry peer's allowed IPs ({', '.join(map(str, peer.allowed_ips))}) "
            "hold no single host address to reach its API at; give --api URL"
        )
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{API_PORT}"


class Source(Protocol):
    """Where the agent learns peers' endpoints: the registry's HTTP API (client.py), a
    DNS-SD registry (dnssd.py) or a rendezvous server (natpunch.py)."""

    # Takes reports and pushes punch events to both sides of a pair (the registry's API).
    coordinates_punches: bool

    @property
    def following(self) -> str:
        """What the agent follows, for the log line once it hears from it."""
        ...

    def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]: ...
    async def snapshot(self) -> Snapshot: ...
    async def punch(self, peer: Key) -> None: ...
    # Our NAT is open toward `peer` after its punch event: its initiation may go. Only a
    # source that coordinates punches is ever asked.
    async def opened(self, peer: Key) -> None: ...
    async def relay(self, peer: Key) -> RelayEvent:
        """A relay slot for the pair (only where `coordinates_punches`), else ApiError."""
        ...
    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        """A relayed pair goes direct: we reach `peer` at `endpoint`, it reaches us at
        `peer_endpoint` (only where `coordinates_punches`), else ApiError."""
        ...
    async def report_self(self, report: Reported) -> None: ...
    def lookup_failed(self, peer: Key) -> bool: ...
    async def close(self) -> None: ...


async def polled(interval_s: float, snapshot: Callable[[], Awaitable[Snapshot]]
                 ) -> AsyncIterator[Event]:
    """A snapshot every `interval_s`, start to start, whatever a poll took: for registries
    that can only be asked (DNS-SD, natpunch). Fractions of a second are honoured (natpunch-go
    truncates `-d 0.5` to no pause at all)."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            event = await snapshot()
        except ApiError:
            raise
        except WgpunchError as error:  # the device or the socket, for now: the agent retries
            raise ApiError(str(error)) from None
        yield event
        await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))
