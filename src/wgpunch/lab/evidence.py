"""Is a pair of lab hosts on a direct path? Decided from what `wg` shows, not from what the
agents say: each side's device must hold a recent handshake with the other, on an endpoint at
the other side's public address (its outermost NAT), which is where the registry sees it too,
or at its global IPv6 address (no NAT there: `ipv6`); or, for hosts behind one NAT, at the
other side's own LAN address (the `lan` path); or, for a pair a registry relays, at that
registry's public address (the `relay` path; with several registries, any one's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..wg.model import DeviceState, Endpoint
from ..wg.uapi import UapiDevice
from .lab import Lab

# A handshake within Reject-After-Time (whitepaper §6.1): the session can still carry data.
RECENT_S = 180.0
POLL_S = 0.005  # a UAPI get per host costs ~1 ms; this resolves time-to-direct finely


@dataclass(frozen=True)
class Side:
    host: str
    peer: str
    endpoint: Endpoint | None  # this host's device's endpoint for the peer
    peer_public_ip: str  # where the peer's NAT faces the internet
    peer_private_ip: str | None  # the peer's own address on its LAN
    registry_sees: Endpoint | None  # the registry device's endpoint for the peer
    handshake_age_s: float | None
    rx_bytes: int
    tx_bytes: int
    relay_ips: tuple[str, ...] = ()  # the registries' public addresses, where relays listen
    peer_public_ip6: str | None = None  # the peer's global IPv6 address; None: it has none

    @property
    def direct(self) -> bool:
        return self._recent_on(self.peer_public_ip) or self.ipv6

    @property
    def ipv6(self) -> bool:
        return self.peer_public_ip6 is not None and self._recent_on(self.peer_public_ip6)

    @property
    def lan(self) -> bool:
        return self.peer_private_ip is not None and self._recent_on(self.peer_private_ip)

    @property
    def relay(self) -> bool:
        return any(self._recent_on(ip) for ip in self.relay_ips)

    def _recent_on(self, ip: str) -> bool:
        return (
            self.endpoint is not None
            and str(self.endpoint.ip) == ip
            and self.handshake_age_s is not None
            and self.handshake_age_s < RECENT_S
        )


@dataclass(frozen=True)
class Pair:
    a: Side
    b: Side

    @property
    def direct(self) -> bool:
        return self.a.direct and self.b.direct

    @property
    def lan(self) -> bool:
        return self.a.lan and self.b.lan

    @property
    def ipv6(self) -> bool:
        """Direct, and over IPv6 on both sides."""
        return self.a.ipv6 and self.b.ipv6

    @property
    def relayed(self) -> bool:
        return self.a.relay and self.b.relay

    @property
    def path(self) -> str:
        return ("direct" if self.direct else "lan" if self.lan
                else "relay" if self.relayed else "none")


async def read_devices(lab: Lab) -> dict[str, DeviceState]:
    devices = {h.name: UapiDevice(h.ifname) for h in lab.hosts.values() if h.ifname is not None}
    states = await asyncio.gather(*(device.state() for device in devices.values()))
    return dict(zip(devices, states, strict=True))


def side(lab: Lab, devices: dict[str, DeviceState], host: str, peer: str,
         now: float) -> Side:
    other = lab.host(peer)
    assert other.public_key is not None, f"{peer} has no WireGuard device"
    mine = devices[host].peer(other.public_key)
    seen = devices["registry"].peer(other.public_key)
    return Side(
        host=host, peer=peer,
        endpoint=None if mine is None else mine.endpoint,
        peer_public_ip=str(other.public_ip),
        peer_private_ip=None if other.private_ip is None else str(other.private_ip),
        registry_sees=None if seen is None else seen.endpoint,
        handshake_age_s=None if mine is None else mine.handshake_age(now),
        rx_bytes=0 if mine is None else mine.rx_bytes,
        tx_bytes=0 if mine is None else mine.tx_bytes,
        relay_ips=tuple(str(node.public_ip) for node in lab.plan.registries),
        peer_public_ip6=None if other.public_ip6 is None else str(other.public_ip6),
    )


def pairs(lab: Lab, devices: dict[str, DeviceState], now: float | None = None) -> list[Pair]:
    now = time.time() if now is None else now
    names = [n for n, h in lab.hosts.items() if h.node.role == "host" and h.ifname is not None]
    return [
        Pair(side(lab, devices, a, b, now), side(lab, devices, b, a, now))
        for i, a in enumerate(names) for b in names[i + 1:]
    ]


async def wait_direct(
    lab: Lab,
    timeout_s: float,
    *,
    check: Callable[[], None] | None = None,
    accept: Callable[[Pair], bool] | None = None,
    lan_ok: bool = False,
    relay_ok: bool = False,
) -> dict[tuple[str, str], tuple[Pair, float | None]]:
    """Poll the devices until every pair is direct (or, with `lan_ok`, on its LAN path; with
    `relay_ok`, relayed; and `accept`ed) or `timeout_s` passes.

    Returns each pair's last evidence and the seconds until it first qualified (None:
    never). `check` runs every round (e.g. "are the agents still alive?").
    """
    start = time.monotonic()
    first: dict[tuple[str, str], float] = {}
    while True:
        if check is not None:
            check()
        now = time.monotonic()
        latest = pairs(lab, await read_devices(lab))
        for pair in latest:
            key = (pair.a.host, pair.b.host)
            up = pair.direct or (lan_ok and pair.lan) or (relay_ok and pair.relayed)
            if key not in first and up and (accept is None or accept(pair)):
                first[key] = now - start
        if len(first) == len(latest) or now - start > timeout_s:
            return {(p.a.host, p.b.host): (p, first.get((p.a.host, p.b.host))) for p in latest}
        await asyncio.sleep(POLL_S)
